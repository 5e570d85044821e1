"""Support verbs that read what customers did (issue #18): ``supportlens paths``.

(``lookup`` and ``top`` still live in :mod:`supportlens.cli`; they belong here too.)
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
import typer
from rich.console import Console

console = Console()


def paths(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="How far back, e.g. 24h, 7d.")] = "7d",
    steps: Annotated[int, typer.Option(help="How many of the last behaviour steps before a report make its path.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The most common paths into a fault report, per diagnosis class: what users did just before
    they complained (consented behaviour only)."""
    from supportlens.store.lookup import parse_duration
    from supportlens.support.access import open_support
    from supportlens.support.render import paths_table

    until = time.time_ns() // 1000
    found = open_support(ctx.obj).common_paths(until - parse_duration(since) * 1_000_000, until, steps)
    if as_json:
        print(msgspec.json.encode(found).decode())
    else:
        console.print(paths_table(found))
