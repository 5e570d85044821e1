"""Recent changes (deploys, config changes, feature flags, infrastructure) from the ``changes`` table.

``supportlens changes`` and the support API's ``/v1/changes`` call :func:`recent_changes`.
Inputs are checked in the user's words before a query runs; values reach ClickHouse as
bound parameters.
"""

from __future__ import annotations

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.store.lookup import LookupInputError, check_limit

MAX_SERVICE = 256


class ChangeRow(msgspec.Struct, frozen=True, kw_only=True):
    """One change as stored: its latest post."""

    change_id: str
    kind: str
    service: str
    version: str = ""
    from_version: str = ""
    region: str = ""
    platform: str = ""
    started_at_us: int
    finished_at_us: int | None = None
    author: str = ""
    link: str = ""
    description: str = ""
    drill: bool = False


class RecentChanges(msgspec.Struct, frozen=True, kw_only=True):
    since_us: int
    until_us: int
    service: str  # "": every service
    rows: list[ChangeRow]  # latest first


def recent_changes(client: Client, since_us: int, until_us: int, service: str = "", limit: int = 200,
                   include_drills: bool = False) -> RecentChanges:
    """Changes that overlap ``[since_us, until_us]`` (started in it, or finished in it after starting
    before), latest start first; one never said to have finished counts as instantaneous.

    Raises :class:`LookupInputError` for a service name no change could have, or a bad limit.
    """
    if len(service) > MAX_SERVICE or any(ord(ch) < 0x20 for ch in service):
        raise LookupInputError(f"{service[:40]!r} is not a service name", hint="e.g. --service payment")
    limit = check_limit(limit)
    rows = client.query(
        "SELECT change_id, kind, service, version, from_version, region, platform, "
        "toUnixTimestamp64Micro(started_at), if(isNull(finished_at), NULL, toUnixTimestamp64Micro(finished_at)), "
        "author, link, description, drill FROM changes FINAL "
        "WHERE started_at <= fromUnixTimestamp64Micro({until:Int64}) "
        "AND ifNull(finished_at, started_at) >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND ({service:String} = '' OR service = {service:String}) AND (drill = 0 OR {drills:Bool}) "
        "ORDER BY started_at DESC, change_id LIMIT {limit:UInt32}",
        parameters={"since": since_us, "until": until_us, "service": service, "drills": include_drills,
                    "limit": limit},
    ).result_rows
    fields = ("change_id", "kind", "service", "version", "from_version", "region", "platform", "started_at_us",
              "finished_at_us", "author", "link", "description", "drill")
    return RecentChanges(since_us=since_us, until_us=until_us, service=service,
                         rows=[ChangeRow(**dict(zip(fields, row))) for row in rows])
