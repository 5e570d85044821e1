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
from supportlens.store.daily import BASELINE_DAYS, Count, DailyFigures, IncidentLine
from supportlens.store.account_report import AccountFigures
from supportlens.store.perception import PerceptionFigures

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
    kind: str = "bar"  # bar | line (a series over days)


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


def _per_thousand(reports: int, users: int) -> float:
    return 1000 * reports / users if users else 0.0


def _duration(start_us: int, end_us: int | None) -> str:
    return "—" if end_us is None else _seconds((end_us - start_us) / 1e6)


def perception_document(figures: PerceptionFigures, locale: str, database: str) -> Document:
    w = words(locale)
    now, before = figures.totals, figures.before
    days = [d.day for d in figures.days]
    sections = [
        Section(w["failure_share"], chart=Chart("failure-share", days, [
            round(100 * d.failed_requests / d.requests, 2) if d.requests else 0.0 for d in figures.days], "%", "line")),
        Section(w["affected_users"], chart=Chart("affected-users", days,
                                                 [float(d.affected_users) for d in figures.days], w["users"], "line")),
        Section(w["complaints"], chart=Chart("complaints", days, [
            round(_per_thousand(d.reports, d.users), 2) for d in figures.days], w["per_thousand"], "line")),
        Section(w["against_before"], table=Table([w["figure"], w["this_period"], w["period_before"]], [
            [w["failure_share"], _share(now.failed_requests, now.requests), _share(before.failed_requests, before.requests)],
            [w["affected_users"], f"{now.affected_users:,}", f"{before.affected_users:,}"],
            [w["complaints"], f"{_per_thousand(now.reports, now.users):.2f}", f"{_per_thousand(before.reports, before.users):.2f}"],
            [w["answered"], _share(now.answered, now.diagnosed), _share(before.answered, before.diagnosed)],
        ])),
        Section(w["answered"], w["answered_text"].format(answered=f"{now.answered:,}", reports=f"{now.diagnosed:,}",
                                                         share=_share(now.answered, now.diagnosed))),
    ]
    for title, moved in ((w["grown_most"], figures.grown), (w["shrunk_most"], figures.shrunk)):
        if moved:
            sections.append(Section(title, table=Table([w["class"], w["service"], w["this_period"], w["period_before"]],
                                                       [[m.diagnosis_class, m.service or "—", f"{m.requests:,}",
                                                         f"{m.before:,}"] for m in moved])))
    sections.append(_incident_timing(figures.incidents, w))
    if figures.catalogue:
        sections.append(Section(w["catalogue"], w["catalogue_note"], table=Table(
            [w["class"], w["code"], w["entry"], w["count"]],
            [[c.diagnosis_class, c.code, c.title, f"{c.reports:,}"] for c in figures.catalogue])))
    sections.append(_funnels(figures, w))
    intro = w["perception_intro"].format(first=figures.first_day, last=figures.last_day,
                                         requests=f"{now.requests:,}", reports=f"{now.reports:,}",
                                         users=f"{now.users:,}")
    title = w[f"perception_title_{figures.period}"].format(first=figures.first_day, last=figures.last_day)
    return Document(locale, title, intro, sections, w["footer"].format(database=database))


def _funnels(figures: PerceptionFigures, w: dict) -> Section:
    """Where users get stuck: each funnel, and the app versions and platforms stuck elsewhere."""
    lines = [f for f in figures.funnels if f.entered]
    if not lines:
        return Section(w["funnels"], w["funnels_none"])
    rows = []
    for f in lines:
        stuck = "; ".join(w["stuck_line"].format(app_version=s.app_version, platform=s.platform, step=s.drop_step,
                                                 share=f"{s.drop_share:.0%}", users=f"{s.entered:,}")
                          for s in f.stuck)
        rows.append([f.funnel, f"{f.entered:,}", f"{f.completed_share:.0%}",
                     "—" if f.completed_before is None else f"{f.completed_before:.0%}",
                     f"{f.drop_step} (−{f.drop_share:.0%})" if f.drop_step else "—", stuck or "—"])
    return Section(w["funnels"], w["funnels_note"], table=Table(
        [w["funnel"], w["entered"], w["completed"], w["period_before"], w["drops_most_at"], w["stuck_elsewhere"]], rows))


def _incident_timing(incidents: list[IncidentLine], w: dict) -> Section:
    if not incidents:
        return Section(w["incidents_period"], w["incidents_none_period"])
    return Section(w["incidents_period"], table=Table(
        [w["incident"], w["severity"], w["root"], w["to_declare"], w["to_resolve"], w["affected"]],
        [[f"{i.incident_id} {i.title}", i.severity, i.root_key, _duration(i.started_at_us, i.declared_at_us),
          _duration(i.started_at_us, i.resolved_at_us) if i.resolved_at_us else w["open"], f"{i.affected_users:,}"]
         for i in incidents]))


def account_document(figures: AccountFigures, locale: str, database: str) -> Document:
    w = words(locale)
    sections = []
    if figures.notices:
        sections.append(Section(w["account_incidents"], table=Table(
            [w["incident"], w["root"], w["told_at"], w["followed_up"]],
            [[f"{n.incident_id} {n.title}", n.root_key, _when(n.told_at_us), _when(n.followed_up_at_us)]
             for n in figures.notices])))
    else:
        sections.append(Section(w["account_incidents"], w["account_incidents_none"]))
    if figures.misuse:
        sections.append(Section(w["misuse_patterns"], chart=_counts_chart("misuse", figures.misuse, w["requests"])))
    else:
        sections.append(Section(w["misuse_patterns"], w["misuse_none"]))
    if figures.advice:
        sections.append(Section(w["advice_got"], table=Table([w["subject"]], [[a] for a in figures.advice])))
    if figures.open_reports:
        sections.append(Section(w["open_reports"], table=Table(
            [w["report_id"], w["received"], w["class"]],
            [[r.report_id, _when(r.received_at_us), r.diagnosis_class or w["undiagnosed"]] for r in figures.open_reports])))
    else:
        sections.append(Section(w["open_reports"], w["open_none"]))
    intro = w["account_intro"].format(requests=f"{figures.requests:,}", failed=f"{figures.failed_requests:,}",
                                      share=_share(figures.failed_requests, figures.requests),
                                      everyone=_share(figures.everyone_failed, figures.everyone_requests),
                                      reports=f"{figures.reports:,}")
    title = w["account_title"].format(account=figures.account_id, first=figures.first_day, last=figures.last_day)
    return Document(locale, title, intro, sections, w["footer"].format(database=database))
