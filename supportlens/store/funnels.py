"""Where users get stuck (issue #18): funnels defined as data, computed in ClickHouse.

A funnel is a named sequence of behaviour event names (``funnels.toml`` beside this module,
or a file of the same shape) and a window. For every user, ClickHouse's ``windowFunnel``
gives how far they got through the steps, in order, within the window from their first
step; from those levels, per app version, platform or region (or a combination): the users
who entered (reached the first step), the users who reached each step, the step where most
users drop — the step with the largest loss against the one before — and the same figures
for the period before, as long, with the change of the share who completed.

Consent: behaviour is stored only with the user's consent — the gateway withholds events
sent without ``X-Supportlens-Consent: granted`` (``supportlens/gateway/app.py``,
``Gateway.behaviour``) — so a user who never consented is in no funnel. A user who withdrew
consent (a ``consent_withdrawn`` behaviour event, at any time before the query: also one after
the period asked about) is left out of every count, of both periods — their earlier, consented
behaviour stays stored until its retention ends, but no analysis uses it any more.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.errors import UserError
from supportlens.store.lookup import LookupInputError, parse_duration

FUNNELS_PATH = Path(__file__).with_name("funnels.toml")
DIMENSIONS = ("app_version", "platform", "region")
WITHDRAWN = "consent_withdrawn"
MAX_STEPS = 32  # windowFunnel takes at most 32 conditions
HINT = f"see {FUNNELS_PATH} for the shape: [[funnel]] tables with name, window and steps"

Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Step = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class _FunnelEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Name
    description: Annotated[str, msgspec.Meta(max_length=256)] = ""
    window: str = "30m"
    steps: Annotated[tuple[Step, ...], msgspec.Meta(min_length=2, max_length=MAX_STEPS)]


class _FunnelFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    funnel: Annotated[tuple[_FunnelEntry, ...], msgspec.Meta(min_length=1)]


class Funnel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    window_s: int
    steps: tuple[str, ...]


class StepCounts(msgspec.Struct, frozen=True, kw_only=True):
    """One period of one group: the users who reached each step (``reached[0]``: who entered)."""

    entered: int
    reached: list[int]
    drop_step: str  # the step with the largest loss against the one before; "": nobody dropped
    drop_share: float  # of the users at the step before it, the share who never reached it
    completed_share: float  # reached the last step, of those who entered


class FunnelGroup(msgspec.Struct, frozen=True, kw_only=True):
    group: dict[str, str]  # dimension → value; {} for everyone
    now: StepCounts
    before: StepCounts  # the period before, as long (entered 0: nobody then)
    completed_change: float | None  # completed share now minus before; None without users before


class FunnelResult(msgspec.Struct, frozen=True, kw_only=True):
    funnel: str
    description: str
    steps: list[str]
    window_s: int
    total: FunnelGroup
    groups: list[FunnelGroup]  # most users entering first


class FunnelReport(msgspec.Struct, frozen=True, kw_only=True):
    since_us: int
    until_us: int
    by: list[str]
    funnels: list[FunnelResult]


# -- the funnels file ----------------------------------------------------------------------

def load_funnels(path: Path | None = None) -> tuple[Funnel, ...]:
    """The funnels of a TOML file (default: the packaged ``funnels.toml``); :class:`UserError`
    naming the entry and field for a file a person got wrong."""
    path = path or FUNNELS_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"funnels file {path} does not exist", hint=HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not UTF-8 text"
        raise UserError(f"funnels file {path} cannot be read: {reason}", hint=HINT) from None
    return parse_funnels(text, path)


def parse_funnels(text: str, path: Path | str = FUNNELS_PATH) -> tuple[Funnel, ...]:
    """The funnels of a funnels file's text (``path`` names it in errors): the support API gets
    the text the CLI read, so a ``--file`` of one's own works through ``supportlens serve`` too."""
    hint = HINT
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"funnels file {path} is not valid TOML: {exc}", hint=hint) from None
    try:
        entries = msgspec.convert(document, _FunnelFile).funnel
    except msgspec.ValidationError as exc:
        raise UserError(f"funnels file {path}: {_explain(str(exc), document)}", hint=hint) from None
    funnels, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"funnel[{i}] ({entry.name})"
        if entry.name in seen:
            raise UserError(f"funnels file {path}: {where}.name: {entry.name!r} is listed twice", hint=hint)
        seen.add(entry.name)
        repeated = next((s for n, s in enumerate(entry.steps) if s in entry.steps[:n]), None)
        if repeated is not None:
            raise UserError(f"funnels file {path}: {where}.steps: {repeated!r} is listed twice",
                            hint="a step is one behaviour event name, once per funnel")
        try:
            window_s = parse_duration(entry.window)
        except LookupInputError as exc:
            raise UserError(f"funnels file {path}: {where}.window: {exc.message}", hint=exc.hint) from None
        funnels.append(Funnel(name=entry.name, description=entry.description, window_s=window_s, steps=entry.steps))
    return tuple(funnels)


def _explain(message: str, document: dict) -> str:
    """msgspec's ``... - at `$.funnel[0].steps``` as ``funnel[0] (checkout).steps: ...``."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return message[0].lower() + message[1:]
    field = where.rstrip("`").removeprefix("$").lstrip(".") or "file"
    match = re.match(r"funnel\[(\d+)\]", field)
    if match:
        try:
            name = document["funnel"][int(match.group(1))].get("name")
        except (KeyError, IndexError, AttributeError, TypeError):
            name = None
        if isinstance(name, str):
            field = field.replace(match.group(0), f"{match.group(0)} ({name})", 1)
    if text.startswith("Object contains unknown field"):
        unknown = text.removeprefix("Object contains unknown field").strip()
        return f"{field}: unknown field {unknown} (a funnel has name, description, window and steps)"
    return f"{field}: {text[0].lower()}{text[1:]}"


def parse_by(text: str) -> tuple[str, ...]:
    """``app_version``, ``platform``, ``region`` or a comma-separated combination of them."""
    dims = tuple(d.strip() for d in text.split(",") if d.strip())
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown or not dims or len(set(dims)) != len(dims):
        raise LookupInputError(f"--by {text!r}: {'unknown ' + unknown[0] if unknown else 'name each dimension once'}",
                               hint=f"use {', '.join(DIMENSIONS)} or a combination such as app_version,platform")
    return dims


def pick(funnels: tuple[Funnel, ...], name: str) -> tuple[Funnel, ...]:
    """Every funnel (``name`` empty) or the one named."""
    if not name:
        return funnels
    chosen = tuple(f for f in funnels if f.name == name)
    if not chosen:
        raise LookupInputError(f"no funnel {name!r}", hint=f"the funnels file has {', '.join(f.name for f in funnels)}")
    return chosen


# -- SQL -----------------------------------------------------------------------------------

def literal(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def levels_sql(funnel: Funnel, dims: tuple[str, ...], where: str) -> str:
    """Per user (and group of ``dims``): how far they got (``level``, 1 = entered), from the
    behaviour rows ``where`` selects, users who ever withdrew consent left out. Grafana panels
    and :func:`funnel_report` use the same text."""
    conditions = ", ".join(f"name = {literal(step)}" for step in funnel.steps)
    steps = ", ".join(literal(step) for step in funnel.steps)
    keys = ", ".join(("user_id", *dims))
    return (
        f"SELECT {keys}, windowFunnel({funnel.window_s * 1_000_000})"
        f"(toUInt64(toUnixTimestamp64Micro(ts)), {conditions}) AS level "
        f"FROM behaviour FINAL WHERE {where} AND name IN ({steps}) "
        f"AND user_id NOT IN (SELECT user_id FROM behaviour WHERE name = {literal(WITHDRAWN)}) "
        f"GROUP BY {keys}"
    )


def _levels(client: Client, funnel: Funnel, dims: tuple[str, ...], since_us: int,
            until_us: int) -> dict[tuple[str, ...], dict[int, int]]:
    """group → level → users."""
    where = "ts >= fromUnixTimestamp64Micro({since:Int64}) AND ts < fromUnixTimestamp64Micro({until:Int64})"
    inner = levels_sql(funnel, dims, where)
    group = "".join(f"{d}, " for d in dims)
    rows = client.query(
        f"SELECT {group}level, count() FROM ({inner}) WHERE level > 0 GROUP BY {group}level",
        parameters={"since": since_us, "until": until_us}).result_rows
    out: dict[tuple[str, ...], dict[int, int]] = {}
    for row in rows:
        *values, level, users = row
        out.setdefault(tuple(str(v) for v in values), {})[int(level)] = int(users)
    return out


def step_counts(steps: tuple[str, ...] | list[str], levels: dict[int, int]) -> StepCounts:
    """The counts of one group from its users per level (pure)."""
    reached = [sum(n for level, n in levels.items() if level >= k) for k in range(1, len(steps) + 1)]
    losses = [reached[i - 1] - reached[i] for i in range(1, len(steps))]
    worst = max(losses) if losses else 0
    at = losses.index(worst) + 1 if worst > 0 else 0
    return StepCounts(
        entered=reached[0], reached=reached, drop_step=steps[at] if at else "",
        drop_share=round(worst / reached[at - 1], 4) if at else 0.0,
        completed_share=round(reached[-1] / reached[0], 4) if reached[0] else 0.0)


def _group(funnel: Funnel, dims: tuple[str, ...], key: tuple[str, ...], now: dict[int, int],
           before: dict[int, int]) -> FunnelGroup:
    counts_now, counts_before = step_counts(funnel.steps, now), step_counts(funnel.steps, before)
    change = (round(counts_now.completed_share - counts_before.completed_share, 4)
              if counts_before.entered and counts_now.entered else None)
    return FunnelGroup(group=dict(zip(dims, key)), now=counts_now, before=counts_before, completed_change=change)


def funnel_report(client: Client, funnels: tuple[Funnel, ...], since_us: int, until_us: int,
                  by: tuple[str, ...] = ("app_version",)) -> FunnelReport:
    """Every funnel over ``[since_us, until_us)`` per group of ``by``, against the period before."""
    if until_us <= since_us:
        raise LookupInputError("the period is empty", hint="its end must come after its start")
    length = until_us - since_us
    results = []
    for funnel in funnels:
        now = _levels(client, funnel, by, since_us, until_us)
        before = _levels(client, funnel, by, since_us - length, since_us)
        total_now = _levels(client, funnel, (), since_us, until_us).get((), {})
        total_before = _levels(client, funnel, (), since_us - length, since_us).get((), {})
        groups = [_group(funnel, by, key, now.get(key, {}), before.get(key, {})) for key in sorted(set(now) | set(before))]
        groups.sort(key=lambda g: (-g.now.entered, -g.before.entered, tuple(g.group.values())))
        results.append(FunnelResult(funnel=funnel.name, description=funnel.description, steps=list(funnel.steps),
                                    window_s=funnel.window_s, total=_group(funnel, (), (), total_now, total_before),
                                    groups=groups))
    return FunnelReport(since_us=since_us, until_us=until_us, by=list(by), funnels=results)


def stuck_groups(result: FunnelResult, min_users: int = 10, limit: int = 3) -> list[FunnelGroup]:
    """The groups whose users drop most at another step than everyone's — where a version or
    platform has a problem of its own: the worst first; groups of fewer than ``min_users`` left out."""
    everyone = result.total.now
    out = [g for g in result.groups if g.now.entered >= min_users and g.now.drop_step
           and g.now.drop_step != everyone.drop_step]
    out.sort(key=lambda g: (-g.now.drop_share, -g.now.entered))
    return out[:limit]
