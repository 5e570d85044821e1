"""``supportlens changes …``: the deploys, config changes, feature flags and infrastructure changes
(issue #17) — list the recent ones from ClickHouse, post one to Kafka by hand."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Optional

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from supportlens.config import Settings
from supportlens.errors import UserError
from supportlens.fit import Fitted, fit

if TYPE_CHECKING:
    from supportlens.contracts import Change
    from supportlens.store.changes import RecentChanges

changes_app = typer.Typer(
    help="Changes (deploys, config, feature flags, infrastructure): `supportlens changes` lists the recent ones "
         "from ClickHouse, `supportlens changes add` posts one.",
    invoke_without_command=True,
)
console = Console()

KINDS = ("deploy", "config", "feature_flag", "infra")
DELIVERY_TIMEOUT_S = 10.0


@changes_app.callback()
def recent(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="How far back, e.g. 30m, 24h, 7d.")] = "24h",
    service: Annotated[str, typer.Option(help="Only this service or app (default: all).")] = "",
    limit: Annotated[int, typer.Option(help="At most this many changes.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The changes of the window, latest first (without a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from supportlens.store.lookup import parse_duration
    from supportlens.support.access import open_support

    until = time.time_ns() // 1000
    found = open_support(ctx.obj).recent_changes(until - parse_duration(since) * 1_000_000, until, service, limit)
    if as_json:
        print(msgspec.json.encode(found).decode())
    else:
        console.print(changes_table(found))


@changes_app.command("add")
def add(
    ctx: typer.Context,
    kind: Annotated[str, typer.Option(help=f"One of {', '.join(KINDS)}.")],
    service: Annotated[str, typer.Option(help="What changed: a backend service or a client app.")],
    version: Annotated[str, typer.Option(help="The version it changed to.")] = "",
    from_version: Annotated[str, typer.Option(help="The version it changed from.")] = "",
    region: Annotated[str, typer.Option(help="Where (default: every region).")] = "",
    platform: Annotated[str, typer.Option(help="For a client app: ios, android, … (default: all).")] = "",
    author: Annotated[Optional[str], typer.Option(help="Who made it (default: your login name).")] = None,
    link: Annotated[str, typer.Option(help="Where to read more: the pipeline run, the pull request.")] = "",
    description: Annotated[str, typer.Option(help="One line: what changed.")] = "",
    started_at: Annotated[str, typer.Option(
        help="When it started: now, an ISO time (UTC unless it says) or 10m (ago).")] = "now",
    finished_at: Annotated[Optional[str], typer.Option(help="When it finished: now, an ISO time or 10m (ago).")] = None,
    change_id: Annotated[Optional[str], typer.Option(
        "--id", help="Its id; give the same id again to replace it (say, with --finished-at). Default: a new one.",
    )] = None,
) -> None:
    """Post one change to the `changes` topic (what a CI/CD pipeline does through the gateway)."""
    import getpass

    now_us = time.time_ns() // 1000
    raw = {
        "change_id": change_id or f"chg-{uuid.uuid4().hex[:16]}", "kind": kind, "service": service,
        "version": version, "from_version": from_version, "region": region, "platform": platform,
        "author": getpass.getuser() if author is None else author, "link": link, "description": description,
        "started_at_us": _moment(started_at, "--started-at", now_us),
    }
    if finished_at is not None:
        raw["finished_at_us"] = _moment(finished_at, "--finished-at", now_us)
    change = checked_change(raw)
    send_change(ctx.obj, change)
    console.print(f"posted change [bold]{change.change_id}[/]: {describe(change)}")


def checked_change(raw: dict[str, Any]) -> Change:
    """The change the flags describe; a bad value is a :class:`UserError` naming its flag."""
    from supportlens.contracts import Change, InvalidRecord, decode

    if raw["kind"] not in KINDS:
        raise UserError(f"--kind: unknown kind {raw['kind']!r}", hint=f"use one of {', '.join(KINDS)}")
    finished = raw.get("finished_at_us")
    if finished is not None and finished < raw["started_at_us"]:
        raise UserError("--finished-at is before --started-at", hint="a change finishes after it starts")
    try:
        return decode(msgspec.json.encode(raw), Change)
    except InvalidRecord as exc:
        flag = _flag_of(exc.reason)
        raise UserError(f"{flag + ': ' if flag else ''}{exc}",
                        hint="a link is an http(s) URL; an id is 1 to 128 printable characters without spaces; "
                             "names are at most 256 characters") from None


def _flag_of(reason: str) -> str:
    """``--from-version`` for a reason about field `from_version` (the flag a person typed)."""
    if not reason.startswith("field `"):
        return ""
    field = reason.removeprefix("field `").split("`", 1)[0].split(".", 1)[0]
    return {"change_id": "--id", "started_at_us": "--started-at", "finished_at_us": "--finished-at"}.get(
        field, "--" + field.replace("_", "-"))


def _moment(text: str, flag: str, now_us: int) -> int:
    from supportlens.store.lookup import LookupInputError, parse_until

    try:
        return parse_until(text, now_us)
    except LookupInputError as exc:
        raise UserError(f"{flag}: {exc.message}", hint=exc.hint) from None


def send_change(settings: Settings, change: Change) -> None:
    """Produce ``change`` on ``changes``, keyed by its id; :class:`UserError` when Kafka did not store it."""
    from confluent_kafka import KafkaError, Message, Producer

    from supportlens.contracts import encode
    from supportlens.topics import require_topics

    require_topics(settings, ("changes",))
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    producer = Producer(settings.producer_config())
    producer.produce(settings.topic("changes"), key=change.change_id.encode(), value=encode(change),
                     on_delivery=delivered)
    left = producer.flush(DELIVERY_TIMEOUT_S)
    if left or failures:
        raise UserError(f"Kafka at {settings.kafka_bootstrap} did not store the change"
                        + (f": {failures[0]}" if failures else f" within {DELIVERY_TIMEOUT_S:.0f} s"),
                        hint="check the broker (`deploy/local/kafka.sh status`) and post it again with the same --id")


def describe(change: Change) -> str:
    """``payment 1.4.1 → 1.4.2 deployed in eu-west by ann``: the change in one line."""
    versions = f"{change.from_version} → {change.version}" if change.from_version and change.version \
        else change.version
    done = {"deploy": "deployed", "config": "config changed", "feature_flag": "flag changed",
            "infra": "infrastructure changed"}[change.kind]
    where = f" in {change.region}" if change.region else ""
    by = f" by {change.author}" if change.author else ""
    return " ".join(part for part in (change.service, versions, done) if part) + where + by


def changes_table(found: RecentChanges) -> Fitted:
    """The changes of a window, latest first (``supportlens changes``)."""
    count = len(found.rows)
    title = f"{count:,} change{'s' * (count != 1)} since {_utc(found.since_us)}"
    table = Table("change", "kind", "service", "version", "region", "started (UTC)", "finished", "author",
                  "description", title=title + (f" for {found.service}" if found.service else ""))
    for c in found.rows:
        version = f"{c.from_version} → {c.version}" if c.from_version and c.version else c.version
        table.add_row(c.change_id, c.kind + (" (drill)" if c.drill else ""), c.service, version,
                      c.region or "all", _utc(c.started_at_us, _SHORT),
                      _utc(c.finished_at_us, _SHORT) if c.finished_at_us is not None else "", c.author,
                      "\n".join(part for part in (c.description, c.link) if part))
    return fit(table, ids={"change"}, optional=("description", "author", "finished", "region"))


_SHORT = "%m-%d %H:%M:%S"  # in a table, as `supportlens incidents` prints times


def _utc(at_us: int, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(at_us / 1e6, tz=timezone.utc).strftime(fmt)
