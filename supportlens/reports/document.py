"""A report as sections of text, tables and charts, in the reader's locale (pure).

Both renderers, HTML and Markdown, draw the same :class:`Document`, so the page and the
message never say different things.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from supportlens.errors import UserError
from supportlens.store.daily import BASELINE_DAYS, Count, DailyFigures

WORDS_PATH = Path(__file__).with_name("words.toml")
LOCALES = ("en", "zh-CN")


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Chart:
    """A bar chart: one bar per label."""

    chart_id: str
    labels: list[str]
    values: list[float]
    axis: str


@dataclass(frozen=True)
class Section:
    title: str
    text: str = ""
    table: Table | None = None
    chart: Chart | None = None


@dataclass(frozen=True)
class Document:
    locale: str
    title: str
    intro: str
    sections: list[Section] = field(default_factory=list)
    footer: str = ""


@cache
def words(locale: str) -> dict:
    table = tomllib.loads(WORDS_PATH.read_text(encoding="utf-8"))
    if locale not in table:
        raise UserError(f"no report wording for locale {locale!r}", hint=f"use one of {', '.join(table)}")
    return table[locale]


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "—"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def _when(us: int | None) -> str:
    return "—" if us is None else datetime.fromtimestamp(us / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _counts_chart(chart_id: str, counts: list[Count], axis: str) -> Chart:
    return Chart(chart_id, [c.value for c in counts], [float(c.count) for c in counts], axis)


def daily_document(figures: DailyFigures, locale: str, database: str) -> Document:
    w = words(locale)
    sections = []
    if figures.reports_by_class:
        sections.append(Section(w["by_class"], chart=_counts_chart("by-class", figures.reports_by_class, w["count"]),
                                table=Table([w["class"], w["count"]],
                                            [[c.value, f"{c.count:,}"] for c in figures.reports_by_class])))
    for dimension, counts in figures.reports_by_dimension.items():
        if counts:
            sections.append(Section(w["by_dimension"].format(dimension=w["dimensions"][dimension]),
                                    chart=_counts_chart(f"by-{dimension}", counts, w["count"])))
    if figures.problems:
        sections.append(Section(
            w["problems"], w["problems_note"].format(days=BASELINE_DAYS),
            table=Table([w["class"], w["service"], w["requests"], w["users"], w["baseline"], w["trend"]],
                        [[p.diagnosis_class, p.service or "—", f"{p.requests:,}", f"{p.users:,}",
                          f"{p.baseline_daily:,.1f}", w[f"trend_{p.trend}"]] for p in figures.problems]),
            chart=Chart("problems", [f"{p.diagnosis_class} · {p.service or '—'}" for p in figures.problems],
                        [float(p.requests) for p in figures.problems], w["requests"])))
    diagnosed = sum(c.count for c in figures.reports_by_class)
    if diagnosed:
        text = w["diagnosis_text"].format(p50=_seconds(figures.diagnosis_p50_s), p95=_seconds(figures.diagnosis_p95_s),
                                          undiagnosed=f"{figures.undiagnosed:,}", answered=f"{figures.answered:,}",
                                          reports=f"{diagnosed:,}", share=_share(figures.answered, diagnosed))
    else:
        text = w["diagnosis_none"].format(undiagnosed=f"{figures.undiagnosed:,}")
    sections.append(Section(w["diagnosis"], text))
    if figures.incidents:
        sections.append(Section(w["incidents"], table=Table(
            [w["incident"], w["severity"], w["root"], w["declared"], w["resolved"], w["affected"], w["told"]],
            [[f"{i.incident_id} {i.title}", i.severity, i.root_key,
              _when(i.declared_at_us) + ("" if i.declared_by in ("", "policy") else
                                         " " + w["by_person"].format(who=i.declared_by)),
              _when(i.resolved_at_us) if i.resolved_at_us else w["open"], f"{i.affected_users:,}",
              f"{i.accounts_told:,}"] for i in figures.incidents])))
    else:
        sections.append(Section(w["incidents"], w["incidents_none"]))
    if figures.advice:
        sections.append(Section(w["advice"], table=Table(
            [w["account"], w["subject"], w["at"]],
            [[a.account_id, a.subject, _when(a.created_at_us)] for a in figures.advice])))
    else:
        sections.append(Section(w["advice"], w["advice_none"]))
    intro = w["daily_intro"].format(reports=f"{figures.reports:,}", requests=f"{figures.requests:,}",
                                    failed=f"{figures.failed_requests:,}",
                                    share=_share(figures.failed_requests, figures.requests), users=f"{figures.users:,}")
    return Document(locale, w["daily_title"].format(day=figures.day), intro, sections,
                    w["footer"].format(database=database))
