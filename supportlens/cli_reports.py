"""``supportlens report …``: the reports people read (issue #16), one verb per report."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from supportlens.config import Settings
from supportlens.errors import UserError

report_app = typer.Typer(help="Reports people read, from ClickHouse: HTML with charts, and Markdown.",
                         no_args_is_help=True)
console = Console()


@report_app.command("daily")
def daily(
    ctx: typer.Context,
    day: Annotated[str, typer.Option("--date", help="The UTC day: YYYY-MM-DD, today or yesterday.")] = "yesterday",
    locale: Annotated[str, typer.Option(help="en or zh-CN.")] = "en",
    out: Annotated[Path, typer.Option(help="Directory the report files go to.")] = Path("out/reports"),
    formats: Annotated[str, typer.Option("--format", help="html, md, or both: html,md.")] = "html,md",
    email: Annotated[bool, typer.Option("--email", help="Also e-mail it to report_recipients (SMTP settings).")] = False,
) -> None:
    """The daily complaint report: reports by diagnosis and dimension, top problems against the week
    before, time to diagnosis, the day's incidents and the misuse advice sent."""
    from supportlens.reports.document import LOCALES, daily_document
    from supportlens.reports.write import FORMATS, write_report
    from supportlens.store.daily import parse_day
    from supportlens.support.access import open_support

    settings: Settings = ctx.obj
    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise UserError(f"unknown format {', '.join(unknown) or formats!r}", hint=f"use {', '.join(FORMATS)}")
    if locale not in LOCALES:
        raise UserError(f"no report in locale {locale!r}", hint=f"use one of {', '.join(LOCALES)}")
    if email and not settings.report_recipients:
        raise UserError("--email: no one to send the report to",
                        hint="set SUPPORTLENS_REPORT_RECIPIENTS, e.g. '[\"support-leads@example.com\"]'")
    the_day = parse_day(day, datetime.fromtimestamp(time.time(), timezone.utc))
    figures = open_support(settings).daily_figures(the_day.isoformat())
    document = daily_document(figures, locale, settings.clickhouse_database)
    key = f"daily-{figures.day}"
    paths = write_report(document, key, out, chosen)
    for path in paths:
        console.print(f"wrote {path}")
    if email:
        from supportlens.reports.mail import send_report

        page = next((p for p in paths if p.suffix == ".html"), None)
        console.print(f"e-mailed to {', '.join(send_report(settings, document, key, page))}")
