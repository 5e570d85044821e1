"""The daily complaint report's figures, read from ClickHouse (issue #16).

One UTC day: the fault reports by diagnosis class and by dimension, the failed requests'
top problems against the seven days before (new, grown, shrunk), how long reports waited
for a diagnosis and how many still wait, the incidents that started that day, and the
misuse advice sent. Drills are left out everywhere, as in the dashboards and lookups.

Requests and users are counted from ``problem_trends``, as the dashboards count them, so a
day of any size costs one scan of its minutes: ``uniq`` is exact below 65,536 distinct values
and within about 1 % above. The figures are a :class:`DailyFigures` (msgspec, so the support
API can carry them); rendering them for people is :mod:`supportlens.reports`.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.store.lookup import LookupInputError

DAY_US = 86_400 * 1_000_000
BASELINE_DAYS = 7
# A problem is "new" with at least NEW_MIN failed requests and none in the baseline days; "grown"
# ("shrunk") when the day has at least GROWN_RATIO times (at most 1/GROWN_RATIO of) its baseline
# daily mean and differs from it by at least GROWN_MIN requests: small numbers wobble.
NEW_MIN = 5
GROWN_RATIO = 2.0
GROWN_MIN = 10
REPORT_DIMENSIONS = {"service": "diagnosis_service", "region": "region", "network": "isp",
                     "app_version": "app_version", "platform": "platform"}


class Count(msgspec.Struct, frozen=True):
    value: str
    count: int


class Problem(msgspec.Struct, frozen=True):
    diagnosis_class: str
    service: str
    requests: int
    users: int
    baseline_daily: float  # mean failed requests a day over the BASELINE_DAYS before
    trend: str  # new | grown | shrunk | steady


class IncidentLine(msgspec.Struct, frozen=True):
    incident_id: str
    title: str
    root_key: str
    severity: str
    state: str
    started_at_us: int
    declared_at_us: int | None
    resolved_at_us: int | None
    affected_users: int
    declared_by: str
    accounts_told: int


class Advice(msgspec.Struct, frozen=True):
    account_id: str
    subject: str
    created_at_us: int


class DailyFigures(msgspec.Struct, frozen=True):
    day: str  # YYYY-MM-DD, UTC
    requests: int
    failed_requests: int
    users: int
    reports: int
    reports_by_class: list[Count]
    reports_by_dimension: dict[str, list[Count]]
    problems: list[Problem]
    diagnosis_p50_s: float | None
    diagnosis_p95_s: float | None
    undiagnosed: int
    answered: int  # reports diagnosed with a catalogued explanation (not "unknown"): no person needed
    incidents: list[IncidentLine]
    advice: list[Advice]


def parse_day(text: str, now: datetime) -> date:
    """A report day from a person: ``YYYY-MM-DD``, ``today`` or ``yesterday``; never in the future."""
    today = now.astimezone(timezone.utc).date()
    named = {"today": today, "yesterday": today - timedelta(days=1)}
    try:
        day = named.get(text) or date.fromisoformat(text)
    except ValueError:
        raise LookupInputError(f"{text!r} is not a day", hint="give YYYY-MM-DD, today or yesterday") from None
    if day > today:
        raise LookupInputError(f"{day} is in the future", hint=f"the latest day with data is today, {today}")
    return day


def daily_figures(client: Client, day: date, limit: int = 10) -> DailyFigures:
    """The figures of one UTC day; :class:`LookupInputError` when nothing at all was recorded that day."""
    since = int(datetime.combine(day, time(), timezone.utc).timestamp() * 1_000_000)
    until = since + DAY_US
    window = {"since": since, "until": until}
    in_day = "{col} >= fromUnixTimestamp64Micro({{since:Int64}}) AND {col} < fromUnixTimestamp64Micro({{until:Int64}})"
    requests, failed, users = client.query(
        "SELECT uniqMerge(requests), uniqMergeIf(requests, diagnosis_class != 'ok'), uniqMerge(users) "
        f"FROM problem_trends WHERE {in_day.format(col='minute')} AND NOT drill", parameters=window).result_rows[0]
    diagnosed = (f"SELECT * FROM report_diagnoses FINAL WHERE {in_day.format(col='received_at')} AND NOT drill")
    reports = client.query(f"SELECT count() FROM fault_reports FINAL WHERE {in_day.format(col='received_at')} "
                           "AND lower(attributes['supportlens.drill']) != 'true'", parameters=window).result_rows[0][0]
    if not requests and not reports:
        raise LookupInputError(f"nothing was recorded on {day}", hint="pick a day the pipeline ran")
    by_class = [Count(c, n) for c, n in client.query(
        f"SELECT diagnosis_class, count() AS n FROM ({diagnosed}) GROUP BY diagnosis_class ORDER BY n DESC, "
        "diagnosis_class", parameters=window).result_rows]
    by_dimension = {}
    for name, column in REPORT_DIMENSIONS.items():
        by_dimension[name] = [Count(v, n) for v, n in client.query(
            f"SELECT {column} AS v, count() AS n FROM ({diagnosed}) WHERE v != '' GROUP BY v ORDER BY n DESC, v "
            f"LIMIT {int(limit)}", parameters=window).result_rows]
    p50, p95, answered = client.query(
        "SELECT quantileExact(0.5)(wait), quantileExact(0.95)(wait), countIf(diagnosis_class != 'unknown') FROM "
        f"(SELECT dateDiff('millisecond', received_at, diagnosed_at) / 1000 AS wait, diagnosis_class FROM ({diagnosed}))",
        parameters=window).result_rows[0]
    diagnosed_count = sum(c.count for c in by_class)
    undiagnosed = client.query(
        f"SELECT count() FROM fault_reports FINAL WHERE {in_day.format(col='received_at')} "
        "AND lower(attributes['supportlens.drill']) != 'true' AND report_id NOT IN (SELECT report_id FROM report_diagnoses "
        f"WHERE {in_day.format(col='received_at')})", parameters=window).result_rows[0][0]
    return DailyFigures(
        day=day.isoformat(), requests=requests, failed_requests=failed, users=users, reports=reports,
        reports_by_class=by_class, reports_by_dimension=by_dimension,
        problems=_problems(client, since, until, limit),
        diagnosis_p50_s=float(p50) if diagnosed_count else None,
        diagnosis_p95_s=float(p95) if diagnosed_count else None,
        undiagnosed=undiagnosed, answered=answered,
        incidents=incident_lines(client, since, until), advice=_advice(client, since, until),
    )


def _problems(client: Client, since: int, until: int, limit: int) -> list[Problem]:
    rows = client.query(
        "SELECT diagnosis_class, service, "
        "uniqMergeIf(requests, minute >= fromUnixTimestamp64Micro({since:Int64})) AS today, "
        "uniqMergeIf(users, minute >= fromUnixTimestamp64Micro({since:Int64})) AS today_users, "
        "uniqMergeIf(requests, minute < fromUnixTimestamp64Micro({since:Int64})) AS before "
        "FROM problem_trends WHERE minute >= fromUnixTimestamp64Micro({start:Int64}) "
        "AND minute < fromUnixTimestamp64Micro({until:Int64}) AND NOT drill AND diagnosis_class != 'ok' "
        "GROUP BY diagnosis_class, service",
        parameters={"since": since, "until": until, "start": since - BASELINE_DAYS * DAY_US}).result_rows
    problems = [Problem(cls, service, today, users, before / BASELINE_DAYS, trend(today, before / BASELINE_DAYS))
                for cls, service, today, users, before in rows if today or before]
    problems.sort(key=lambda p: (p.users, p.requests, p.diagnosis_class, p.service), reverse=True)
    return problems[:limit]


def trend(today: int, baseline_daily: float) -> str:
    """How a problem's day compares with its baseline (pure; thresholds above)."""
    if baseline_daily == 0:
        return "new" if today >= NEW_MIN else "steady"
    if today >= GROWN_RATIO * baseline_daily and today - baseline_daily >= GROWN_MIN:
        return "grown"
    if today <= baseline_daily / GROWN_RATIO and baseline_daily - today >= GROWN_MIN:
        return "shrunk"
    return "steady"


def incident_lines(client: Client, since: int, until: int) -> list[IncidentLine]:
    """Incidents that started in the window (not drills), with when they were declared and resolved
    and how many accounts were told."""
    rows = client.query(
        "SELECT c.incident_id, c.title, c.root_key, c.severity, c.state, toUnixTimestamp64Micro(c.started_at), "
        "d.declared_at, if(c.resolved_at IS NULL, NULL, toUnixTimestamp64Micro(assumeNotNull(c.resolved_at))), "
        "c.affected_users, d.declared_by, ifNull(t.told, 0) "
        "FROM incidents_current AS c "
        "LEFT JOIN (SELECT incident_id, toUnixTimestamp64Micro(min(at)) AS declared_at, any(declared_by) AS declared_by "
        "           FROM incidents WHERE transition = 'declared' GROUP BY incident_id) AS d USING incident_id "
        "LEFT JOIN (SELECT incident_id, uniqExact(account_id) AS told FROM notifications FINAL "
        "           WHERE kind = 'incident_declared' GROUP BY incident_id) AS t USING incident_id "
        "WHERE c.started_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND c.started_at < fromUnixTimestamp64Micro({until:Int64}) AND NOT c.drill ORDER BY c.started_at",
        parameters={"since": since, "until": until}, settings={"join_use_nulls": 1}).result_rows
    return [IncidentLine(incident_id=r[0], title=r[1], root_key=r[2], severity=r[3], state=r[4], started_at_us=r[5],
                         declared_at_us=r[6], resolved_at_us=r[7], affected_users=r[8], declared_by=r[9] or "",
                         accounts_told=r[10] or 0) for r in rows]


def _advice(client: Client, since: int, until: int) -> list[Advice]:
    rows = client.query(
        "SELECT account_id, subject, toUnixTimestamp64Micro(created_at) FROM notifications FINAL "
        "WHERE kind = 'misuse_advice' AND NOT drill AND created_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND created_at < fromUnixTimestamp64Micro({until:Int64}) ORDER BY created_at, account_id",
        parameters={"since": since, "until": until}).result_rows
    return [Advice(account_id=r[0], subject=r[1], created_at_us=r[2]) for r in rows]
