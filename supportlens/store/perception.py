"""The perception report's figures (感知报告, issue #16): a week or a month against the one before.

Per day of the period: requests, failed requests, users, affected users (with a failed
request) and fault reports, so a reader sees the trend of the failure share, of the users
hurt and of complaints per 1,000 active users. Over the period against the period before:
the problems that grew and shrank most, the incidents with their time to declare and to
resolve, the share of reports the product answered without a person (diagnosed with a
catalogued explanation) — the number that shows support cost going down — and the catalogue
entries most often hit, the candidates for a product or documentation fix. Drills left out.
Where users get stuck (issue #18): per funnel of ``funnels.toml``, the consented users who
entered, the share who completed against the period before, the step most never reached, and
the app versions and platforms that drop most at another step (users who withdrew consent
left out, see ``supportlens.store.funnels``).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.store.daily import DAY_US, IncidentLine, incident_lines
from supportlens.store.funnels import funnel_report, load_funnels, stuck_groups
from supportlens.store.lookup import LookupInputError

PERIODS = ("week", "month")


class DayPoint(msgspec.Struct, frozen=True):
    day: str
    requests: int
    failed_requests: int
    users: int
    affected_users: int
    reports: int


class Totals(msgspec.Struct, frozen=True):
    requests: int
    failed_requests: int
    users: int
    affected_users: int
    reports: int
    diagnosed: int
    answered: int  # diagnosed with a catalogued explanation (not "unknown")


class Moved(msgspec.Struct, frozen=True):
    diagnosis_class: str
    service: str
    requests: int
    before: int  # in the period before, as long


class CatalogueHit(msgspec.Struct, frozen=True):
    diagnosis_class: str
    code: str
    title: str
    reports: int


class StuckLine(msgspec.Struct, frozen=True):
    app_version: str
    platform: str
    entered: int
    drop_step: str
    drop_share: float


class FunnelLine(msgspec.Struct, frozen=True):
    funnel: str
    description: str
    entered: int
    completed_share: float
    completed_before: float | None  # None: nobody entered in the period before
    drop_step: str
    drop_share: float
    stuck: list[StuckLine]  # app version and platform that drop most at another step than everyone


class PerceptionFigures(msgspec.Struct, frozen=True):
    period: str  # week | month
    first_day: str
    last_day: str
    days: list[DayPoint]
    totals: Totals
    before: Totals
    grown: list[Moved]
    shrunk: list[Moved]
    incidents: list[IncidentLine]
    catalogue: list[CatalogueHit]
    funnels: list[FunnelLine] = []


def period_days(period: str, day: date) -> tuple[date, date]:
    """The first and last day of a period: ``week`` is the 7 days ending ``day``; ``month`` the
    calendar month holding it, up to ``day``."""
    if period not in PERIODS:
        raise LookupInputError(f"no {period!r} period", hint=f"use {' or '.join(PERIODS)}")
    if period == "week":
        return day - timedelta(days=6), day
    first = day.replace(day=1)
    return first, day


def day_start_us(day: date) -> int:
    """The microsecond at which a UTC day begins."""
    return int(datetime.combine(day, time(), timezone.utc).timestamp() * 1_000_000)


def perception_figures(client: Client, period: str, day: date, limit: int = 5) -> PerceptionFigures:
    """The figures of the period ending ``day``; :class:`LookupInputError` for an unknown period or an empty one."""
    first, last = period_days(period, day)
    since, until = day_start_us(first), day_start_us(last) + DAY_US
    length = until - since
    window = {"since": since, "until": until, "start": since - length}
    totals, before = _totals(client, since, until), _totals(client, since - length, since)
    if not totals.requests and not totals.reports:
        raise LookupInputError(f"nothing was recorded from {first} to {last}", hint="pick a period the pipeline ran")
    trends = {r[0]: r for r in client.query(
        "SELECT toString(toDate(minute)) AS d, uniqMerge(requests), uniqMergeIf(requests, diagnosis_class != 'ok'), "
        "uniqMerge(users), uniqMergeIf(users, diagnosis_class != 'ok') FROM problem_trends "
        "WHERE minute >= fromUnixTimestamp64Micro({since:Int64}) AND minute < fromUnixTimestamp64Micro({until:Int64}) "
        "AND NOT drill GROUP BY d", parameters=window).result_rows}
    reports = dict(client.query(
        "SELECT toString(toDate(received_at)) AS d, count() FROM fault_reports FINAL "
        "WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND received_at < fromUnixTimestamp64Micro({until:Int64}) "
        "AND lower(attributes['supportlens.drill']) != 'true' GROUP BY d", parameters=window).result_rows)
    days = []
    for n in range((last - first).days + 1):
        d = (first + timedelta(days=n)).isoformat()
        _, requests, failed, users, affected = trends.get(d, (d, 0, 0, 0, 0))
        days.append(DayPoint(d, requests, failed, users, affected, reports.get(d, 0)))
    moved = [Moved(cls, service, now, then) for cls, service, now, then in client.query(
        "SELECT diagnosis_class, service, "
        "uniqMergeIf(requests, minute >= fromUnixTimestamp64Micro({since:Int64})) AS now, "
        "uniqMergeIf(requests, minute < fromUnixTimestamp64Micro({since:Int64})) AS then "
        "FROM problem_trends WHERE minute >= fromUnixTimestamp64Micro({start:Int64}) "
        "AND minute < fromUnixTimestamp64Micro({until:Int64}) AND NOT drill AND diagnosis_class != 'ok' "
        "GROUP BY diagnosis_class, service", parameters=window).result_rows]
    grown = sorted((m for m in moved if m.requests > m.before), key=lambda m: (m.before - m.requests, m.service))
    shrunk = sorted((m for m in moved if m.requests < m.before), key=lambda m: (m.requests - m.before, m.service))
    catalogue = [CatalogueHit(*row) for row in client.query(
        "SELECT diagnosis_class, diagnosis_code, any(title), count() AS n FROM report_diagnoses FINAL "
        "WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND received_at < fromUnixTimestamp64Micro({until:Int64}) AND NOT drill AND diagnosis_code != '' "
        f"GROUP BY diagnosis_class, diagnosis_code ORDER BY n DESC, diagnosis_code LIMIT {int(limit) * 2}",
        parameters=window).result_rows]
    return PerceptionFigures(period=period, first_day=first.isoformat(), last_day=last.isoformat(), days=days,
                             totals=totals, before=before, grown=grown[:limit], shrunk=shrunk[:limit],
                             incidents=incident_lines(client, since, until), catalogue=catalogue,
                             funnels=funnel_lines(client, since, until))


def funnel_lines(client: Client, since: int, until: int) -> list[FunnelLine]:
    """The funnels of the period, per app version and platform, against the period before."""
    report = funnel_report(client, load_funnels(), since, until, ("app_version", "platform"))
    lines = []
    for result in report.funnels:
        now, before = result.total.now, result.total.before
        lines.append(FunnelLine(
            funnel=result.funnel, description=result.description, entered=now.entered,
            completed_share=now.completed_share, completed_before=before.completed_share if before.entered else None,
            drop_step=now.drop_step, drop_share=now.drop_share,
            stuck=[StuckLine(g.group["app_version"], g.group["platform"], g.now.entered, g.now.drop_step,
                             g.now.drop_share) for g in stuck_groups(result)]))
    return lines


def _totals(client: Client, since: int, until: int) -> Totals:
    window = {"since": since, "until": until}
    requests, failed, users, affected = client.query(
        "SELECT uniqMerge(requests), uniqMergeIf(requests, diagnosis_class != 'ok'), uniqMerge(users), "
        "uniqMergeIf(users, diagnosis_class != 'ok') FROM problem_trends "
        "WHERE minute >= fromUnixTimestamp64Micro({since:Int64}) AND minute < fromUnixTimestamp64Micro({until:Int64}) "
        "AND NOT drill", parameters=window).result_rows[0]
    reports = client.query(
        "SELECT count() FROM fault_reports FINAL WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND received_at < fromUnixTimestamp64Micro({until:Int64}) AND lower(attributes['supportlens.drill']) != 'true'",
        parameters=window).result_rows[0][0]
    diagnosed, answered = client.query(
        "SELECT count(), countIf(diagnosis_class != 'unknown') FROM report_diagnoses FINAL "
        "WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND received_at < fromUnixTimestamp64Micro({until:Int64}) AND NOT drill", parameters=window).result_rows[0]
    return Totals(requests, failed, users, affected, reports, diagnosed, answered)
