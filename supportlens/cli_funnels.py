"""``supportlens funnels``: where users get stuck (issue #18) — the funnels of ``funnels.toml``
per app version, platform or region, from ClickHouse, against the period before."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import msgspec
import typer
from rich.console import Console, Group
from rich.table import Table

from supportlens.fit import fit

if TYPE_CHECKING:
    from supportlens.store.funnels import FunnelGroup, FunnelReport, FunnelResult

console = Console()


def funnels(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="How long a period, ending --until: 30m, 24h, 7d. The period "
                                            "before, as long, is the comparison.")] = "7d",
    until: Annotated[str, typer.Option(help="The end of the period: now, an ISO time, or 2h (ago).")] = "now",
    funnel: Annotated[str, typer.Option(help="Only this funnel (default: every funnel of the file).")] = "",
    by: Annotated[str, typer.Option(help="app_version, platform, region, or a combination: app_version,platform.")]
        = "app_version",
    funnels_file: Annotated[Optional[Path], typer.Option(
        "--file", help="The funnels file (default: the packaged supportlens/store/funnels.toml).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Where users get stuck: per funnel and group, the users who entered, reached each step and
    completed, the step where most drop, and the change against the period before."""
    from supportlens.store.funnels import FUNNELS_PATH, load_funnels, parse_by, pick
    from supportlens.store.lookup import parse_duration, parse_until
    from supportlens.support.access import open_support

    parse_by(by)
    pick(load_funnels(funnels_file), funnel)  # a mistake in the file or the name is told here, before any query
    text = (funnels_file or FUNNELS_PATH).read_text(encoding="utf-8")
    until_us = parse_until(until, time.time_ns() // 1000)
    since_us = until_us - parse_duration(since) * 1_000_000
    # through `supportlens serve`'s support API while it holds the embedded store, else directly
    report = open_support(ctx.obj).funnel_report(text, funnel, since_us, until_us, by)
    if as_json:
        print(msgspec.json.encode(report).decode())
        return
    console.print(Group(*(funnel_table(result, report) for result in report.funnels)))


def funnel_table(result: FunnelResult, report: FunnelReport):
    """One funnel: everyone first, then each group, most users entering first."""
    window = f"{result.window_s // 60} min" if result.window_s % 60 == 0 else f"{result.window_s} s"
    title = (f"{result.funnel}" + (f" — {result.description}" if result.description else "")
             + f"\n{_utc(report.since_us)} → {_utc(report.until_us)} UTC, steps within {window}")
    table = Table(*report.by, "entered", *result.steps[1:], "drops most at", "completed", "before",
                  title=title, caption="per step: users who reached it (share of those who entered); "
                                       "before: completed in the period before, as long")
    for group in [result.total, *result.groups]:
        label = [group.group.get(d, "everyone" if i == 0 else "") for i, d in enumerate(report.by)]
        table.add_row(*label, *_cells(group))
    return fit(table, ids=set(report.by), optional=("before",))


def _cells(group: FunnelGroup) -> list[str]:
    now = group.now
    entered = now.entered
    steps = [f"{n:,} ({n / entered:.0%})" if entered else "0" for n in now.reached[1:]]
    drop = f"{now.drop_step} (−{now.drop_share:.0%})" if now.drop_step else "—"
    before = group.before
    if not before.entered:
        versus = "no users"
    else:
        change = group.completed_change
        versus = f"{before.completed_share:.0%}" + (f" ({change * 100:+.1f} pts)" if change is not None else "")
        if before.drop_step and before.drop_step != now.drop_step:
            versus += f", dropped most at {before.drop_step}"
    return [f"{entered:,}", *steps, drop, f"{now.completed_share:.0%}" if entered else "—", versus]


def _utc(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
