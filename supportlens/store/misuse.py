"""Misuse found in a customer's sequence of requests (``misuse_detections``, migration 0013).

The stream's sequence rules (streams/sequences.py) find misuse that is refused nowhere and
fails later, elsewhere; a fault report of that failure is traced to the detection. Support
sees both ends: under a customer's timeline the misuse they made, under a traced report the
misuse it follows from. Values reach ClickHouse as bound parameters only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from clickhouse_connect.driver.client import Client

MAX_USERS = 1_000  # users of an IP's timeline whose detections are looked up


class MisuseHit(msgspec.Struct, frozen=True, kw_only=True):
    """One detection, and how many of the shown fault reports it explains."""

    detection_id: str
    rule: str
    code: str
    at_us: int  # the misusing request
    user_id: str = ""
    account_id: str = ""
    request_id: str = ""
    earlier_request_id: str = ""
    session_id: str = ""
    evidence: str = ""
    drill: bool = False
    reports: int = 0  # fault reports of the lookup traced to it


_COLUMNS = ("SELECT detection_id, rule, code, toUnixTimestamp64Micro(at), user_id, account_id, request_id, "
            "earlier_request_id, session_id, evidence, drill FROM misuse_detections FINAL ")


def _hit(row: Sequence[Any]) -> MisuseHit:
    return MisuseHit(detection_id=row[0], rule=row[1], code=row[2], at_us=row[3], user_id=row[4],
                     account_id=row[5], request_id=row[6], earlier_request_id=row[7], session_id=row[8],
                     evidence=row[9], drill=bool(row[10]))


def detections(client: Client, by: Literal["user", "account"], keys: list[str], since_us: int, until_us: int,
               traced: list[str], limit: int) -> list[MisuseHit]:
    """Detections of these users (or accounts) made in the window, and those the given detection
    ids name (a report in the window may follow from a misuse made before it); newest first."""
    if not keys and not traced:
        return []
    column = "user_id" if by == "user" else "account_id"
    rows = client.query(
        _COLUMNS + f"WHERE ({column} IN {{keys:Array(String)}} "
        "AND at >= fromUnixTimestamp64Micro({since:Int64}) AND at < fromUnixTimestamp64Micro({until:Int64})) "
        "OR detection_id IN {traced:Array(String)} ORDER BY at DESC, detection_id LIMIT {limit:UInt32}",
        parameters={"keys": keys[:MAX_USERS], "since": since_us, "until": until_us, "traced": traced,
                    "limit": limit},
    ).result_rows
    return [_hit(row) for row in rows]


def detection(client: Client, detection_id: str) -> MisuseHit | None:
    """One detection by its id; None while the sink has not stored it (or never will)."""
    if not detection_id:
        return None
    rows = client.query(_COLUMNS + "WHERE detection_id = {id:String} LIMIT 1",
                        parameters={"id": detection_id}).result_rows
    return _hit(rows[0]) if rows else None


def with_reports(hits: list[MisuseHit], traced: list[str]) -> list[MisuseHit]:
    """Each detection with the count of ``traced`` (the detection ids of reports) that name it (pure)."""
    return [msgspec.structs.replace(hit, reports=traced.count(hit.detection_id)) for hit in hits]
