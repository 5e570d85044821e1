"""``supportlens report …``: the reports people read (issue #16), one verb per report."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from supportlens.config import Settings
from supportlens.errors import UserError

if TYPE_CHECKING:
    from supportlens.reports.document import Document
    from supportlens.support.access import Support

report_app = typer.Typer(help="Reports people read, from ClickHouse: HTML with charts, and Markdown.",
                         no_args_is_help=True)
console = Console()

Day = Annotated[str, typer.Option("--date", help="The UTC day: YYYY-MM-DD, today or yesterday.")]
Locale = Annotated[str, typer.Option(help="en or zh-CN.")]
Out = Annotated[Path, typer.Option(help="Directory the report files go to.")]
Formats = Annotated[str, typer.Option("--format", help="html, md, or both: html,md.")]
Email = Annotated[bool, typer.Option("--email", help="Also e-mail it to report_recipients (SMTP settings).")]


@report_app.command("daily")
def daily(ctx: typer.Context, day: Day = "yesterday", locale: Locale = "en", out: Out = Path("out/reports"),
          formats: Formats = "html,md", email: Email = False) -> None:
    """The daily complaint report: reports by diagnosis and dimension, top problems against the week
    before, time to diagnosis, the day's incidents and the misuse advice sent."""
    from supportlens.reports.document import daily_document

    def build(support: Support, the_day: date, settings: Settings) -> tuple[Document, str]:
        figures = support.daily_figures(the_day.isoformat())
        return daily_document(figures, locale, settings.clickhouse_database), f"daily-{figures.day}"

    _report(ctx.obj, day, locale, out, formats, email, build)


@report_app.command("perception")
def perception(ctx: typer.Context,
               period: Annotated[str, typer.Option(help="week (the 7 days ending --date) or month (its month "
                                                        "up to --date).")] = "week",
               day: Day = "yesterday", locale: Locale = "en", out: Out = Path("out/reports"),
               formats: Formats = "html,md", email: Email = False) -> None:
    """The weekly or monthly perception report: trends of failures, users hurt and complaints, the
    problems that moved most, incident timings, reports answered without a person, catalogue hits."""
    from supportlens.reports.document import perception_document

    def build(support: Support, the_day: date, settings: Settings) -> tuple[Document, str]:
        figures = support.perception_figures(period, the_day.isoformat())
        key = f"perception-{period}-{figures.last_day}"
        return perception_document(figures, locale, settings.clickhouse_database), key

    _report(ctx.obj, day, locale, out, formats, email, build)


@report_app.command("account")
def account(ctx: typer.Context,
            account_id: Annotated[str, typer.Option("--account", help="The account, e.g. acct-00001.")],
            period: Annotated[str, typer.Option(help="week or month, ending --date.")] = "month",
            day: Day = "yesterday", locale: Locale = "en", out: Out = Path("out/reports"),
            formats: Formats = "html,md", email: Email = False) -> None:
    """One customer's report for their service manager: requests and failure share against everyone's,
    incidents that touched them and when they were told, misuse and advice, reports needing a person."""
    from supportlens.reports.document import account_document

    def build(support: Support, the_day: date, settings: Settings) -> tuple[Document, str]:
        figures = support.account_figures(account_id, period, the_day.isoformat())
        key = f"account-{account_id}-{period}-{figures.last_day}"
        return account_document(figures, locale, settings.clickhouse_database), key

    manager = []
    if email:
        from supportlens.accounts import read_accounts

        found = next((a for a in read_accounts(ctx.obj) if a.account_id == account_id), None)
        manager = [found.service_manager] if found is not None and found.service_manager else []
    _report(ctx.obj, day, locale, out, formats, email, build, manager)


def _report(settings: Settings, day: str, locale: str, out: Path, formats: str, email: bool,
            build: Callable[[Support, date, Settings], tuple[Document, str]], recipients: list[str] | None = None,
            ) -> None:
    """Check what a person asked for before asking ClickHouse; write the files; mail them."""
    from supportlens.reports.document import LOCALES
    from supportlens.reports.write import FORMATS, write_report
    from supportlens.store.daily import parse_day
    from supportlens.support.access import open_support

    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise UserError(f"unknown format {', '.join(unknown) or formats!r}", hint=f"use {', '.join(FORMATS)}")
    if locale not in LOCALES:
        raise UserError(f"no report in locale {locale!r}", hint=f"use one of {', '.join(LOCALES)}")
    if email and not recipients and not settings.report_recipients:
        raise UserError("--email: no one to send the report to",
                        hint="set SUPPORTLENS_REPORT_RECIPIENTS, e.g. '[\"support-leads@example.com\"]' "
                             "(an account report also goes to the account's service_manager)")
    the_day = parse_day(day, datetime.fromtimestamp(time.time(), timezone.utc))
    document, key = build(open_support(settings), the_day, settings)
    paths = write_report(document, key, out, chosen)
    for path in paths:
        console.print(f"wrote {path}")
    if email:
        from supportlens.reports.mail import send_report

        page = next((p for p in paths if p.suffix == ".html"), None)
        console.print(f"e-mailed to {', '.join(send_report(settings, document, key, page, recipients))}")
