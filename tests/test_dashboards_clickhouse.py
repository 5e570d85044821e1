"""Every ClickHouse query of every dashboard — panels, template variables, annotations — runs
against real ClickHouse loaded with simulated data, expanded exactly as the Grafana plugin
expands it (``grafana_sql.expand``), and returns the columns its panel reads.

The data: two simulated days at 04:00 UTC, replayed through the pipeline's own pure
functions (correlation, diagnosis, surge detection, declaration policy) and stored through
the sink's row mapping — a payment outage that is declared and resolved, and an ISP outage
cut off while its incident is still open; the runs' behaviour events (consented users walking
the funnels) feed the funnels panel. Changes have no producer in the replay: the test
writes those a CI/CD pipeline would post around the runs, and some the annotation must
leave out (a drill, one over before the range). Notifications and their deliveries have no
producer yet (VIP notices are issue #6): the test writes the outbox rows that producer
will write, one ``incident_declared`` notice per affected VIP account. Misuse found in
sequences (issue #18) is not in the offline replay: the test writes the detections the
sequence worker would, and re-emits some reports of the payment outage traced to them.

Runs on the embedded engine here; on a server when ``CLICKHOUSE_URL`` is set or Docker answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgspec
import pytest

from dashboards.build import all_dashboards
from dashboards.common import Dashboard, Sql
from helpers import insert_records, own_database
from grafana_sql import Selection, TimeRange, expand
from streams.catalog import load_catalog
from streams.correlate import add_span, build_request
from streams.detect import EngineConfig, Outputs
from streams.diagnose import diagnose_report, primary_request_id
from streams.incidents import load_policy
from streams.offline import replay
from streams.surge import SurgeParams
from supportlens.cli_changes import describe
from supportlens.contracts import (
    BehaviourEvent, Change, CorrelatedRequest, DeliveryAttempt, DiagnosedReport, Diagnosis, FaultReport, IncidentEvent,
    MisuseDetection, Notification, Span, SurgeEvent,
)
from supportlens.simulator.generate import Plan, Simulation
from supportlens.simulator.scenarios import scenario
from supportlens.simulator.world import World, build_world

pytestmark = pytest.mark.clickhouse

US = 1_000_000
DAY_US = 86_400 * US
SEED, USERS, RATE, DURATION_S = 7, 5000, 50, 600
CATALOG = load_catalog()
ENGINE = EngineConfig(SurgeParams(warmup_buckets=6))  # short runs: one minute of warm-up, as the offline tests
DASHBOARDS = [d for d in all_dashboards() if any(True for _ in d.sql())]


@dataclass
class Run:
    requests: list[CorrelatedRequest]
    reports: list[FaultReport]
    out: Outputs
    behaviour: list[BehaviourEvent]


def _run(name: str, start_us: int, world: World, until_fraction: float = 1.0) -> Run:
    """One simulated scenario through correlation, diagnosis and the surge/incident engine."""
    plan = Plan(scenario(name), RATE, DURATION_S, SEED, start_us)
    cut = start_us + int(DURATION_S * until_fraction * US)
    emits = [e for tick in Simulation(plan, world).ticks() for e in tick.events if e.ts_us < cut]
    pending: dict[str, Any] = {}
    for emit in emits:
        if isinstance(emit.record, Span):
            pending[emit.record.request_id], _ = add_span(pending.get(emit.record.request_id), emit.record, 0.0)
    requests = [build_request(request_id, state, CATALOG) for request_id, state in pending.items()]
    reports = [e.record for e in emits if isinstance(e.record, FaultReport)]
    out = replay(((e.ts_us, e.record) for e in emits), CATALOG, load_policy(), ENGINE)
    behaviour = [e.record for e in emits if isinstance(e.record, BehaviourEvent)]
    return Run(requests, reports, out, behaviour)


def _vip_outbox(run: Run, world: World) -> tuple[list[Notification], list[DeliveryAttempt]]:
    """What the VIP notifier (issue #6) writes: per declared incident, one notice per VIP account whose
    requests failed while it was open, and its delivery attempts (every fifth fails once, then succeeds)."""
    accounts = {a.account_id: a for a in world.accounts}
    notices, attempts = [], []
    for declared in (e for e in run.out.incidents if e.transition == "declared"):
        resolved = next((e.at_us for e in run.out.incidents
                         if e.incident_id == declared.incident_id and e.transition == "resolved"), None)
        affected = sorted({r.account_id for r in run.requests
                           if r.diagnosis.cls != "ok" and r.account_id in world.vip_accounts
                           and declared.started_at_us <= r.start_us <= (resolved or r.start_us)})
        for i, account_id in enumerate(affected):
            account = accounts[account_id]
            notice = Notification(
                notification_id=f"{declared.incident_id}:{account_id}:declared", account_id=account_id,
                kind="incident_declared", created_at_us=declared.at_us + US, incident_id=declared.incident_id,
                channel=account.channel, locale=account.locale, subject=f"Incident: {declared.title}",
                body=declared.reason,
            )
            notices.append(notice)
            if account.channel == "none":
                continue
            at = notice.created_at_us + US
            if i % 5 == 0:
                attempts.append(DeliveryAttempt(notification_id=notice.notification_id, attempt=1,
                                                account_id=account_id, at_us=at, channel=account.channel,
                                                outcome="failed", detail="HTTP 503"))
                at += 2 * US
            attempts.append(DeliveryAttempt(notification_id=notice.notification_id, attempt=1 + (i % 5 == 0),
                                            account_id=account_id, at_us=at, channel=account.channel,
                                            outcome="delivered", detail="HTTP 200"))
    return notices, attempts


def _changes(first_us: int, second_us: int) -> tuple[list[Change], list[Change], set[str]]:
    """The changes posted around the two runs: the first posts, their re-posts (the first post's
    fields replaced), and the ids the range's annotation must show (the range starts an hour
    before the first run)."""
    hour = 3600 * US
    posts = [
        Change(change_id="deploy-payment-1.4.2", kind="deploy", service="payment", version="1.4.2",
               from_version="1.4.1", region="eu-west", started_at_us=first_us - 300 * US, author="ann",
               link="https://ci.example.com/pipelines/8812", description="retry budget for the card network"),
        Change(change_id="config-edge-timeouts", kind="config", service="edge", started_at_us=second_us + 60 * US,
               author="bob", description="upstream timeout 5 s → 3 s"),
        # a rollout that began before the range and finished inside it: a region into the range
        Change(change_id="infra-db-failover", kind="infra", service="payments-db", started_at_us=first_us - 2 * hour,
               finished_at_us=first_us + 60 * US),
        # left out: a drill, and a change over an hour before the range began
        Change(change_id="drill-flag", kind="feature_flag", service="shop-app", started_at_us=first_us, drill=True),
        Change(change_id="infra-old", kind="infra", service="edge", started_at_us=first_us - 3 * hour,
               finished_at_us=first_us - 2 * hour),
    ]
    reposts = [msgspec.structs.replace(posts[0], finished_at_us=first_us + 600 * US)]  # the rollout is done
    return posts, reposts, {"deploy-payment-1.4.2", "config-edge-timeouts", "infra-db-failover"}


def _canary(at_us: int) -> list[SurgeEvent]:
    """A canary finding as the engine writes one (tests/test_canary.py drives the engine itself):
    payment 1.4.2 failing against 1.4.1, from its start to its end."""
    attributes = {"target": "payment", "version": "1.4.2", "baseline_version": "1.4.1",
                  "diagnosis_class": "server_error", "failure_share": 0.61, "baseline_failure_share": 0.004,
                  "requests": 212, "baseline_requests": 1890, "p_value": 1e-40}
    return [SurgeEvent(surge_id="canary-0123456789ab", phase=phase, kind="canary", at_us=at_us + i * 10 * US,  # type: ignore[arg-type]
                       started_at_us=at_us, dimension="service", value="payment", score=1.0,
                       failed_requests=129, attributes=attributes)
            for i, phase in enumerate(("start", "update", "end"))]


def _misuse(diagnosed: list[DiagnosedReport]) -> tuple[list[MisuseDetection], list[DiagnosedReport]]:
    """What the sequence worker (streams/sequences.py) writes around a payment outage: an order that
    reused an earlier order's idempotency key five minutes before each of three users reported a
    payment failure, the first two of those reports traced to it; one user polling too fast (nothing
    traced); and a drill's detection, which every panel leaves out."""
    failed = [r for r in diagnosed if r.diagnosis.cls == "server_error" and r.user_id][:3]
    assert len(failed) == 3, "the payment outage gives server_error reports"
    detections = [MisuseDetection(
        detection_id=f"idempotency-key-reuse:order-{i}", rule="idempotency-key-reuse", code="IDEMPOTENCY_KEY_REUSED",
        user_id=r.user_id, account_id=r.account_id, at_us=r.received_at_us - 300 * US, request_id=f"order-{i}",
        earlier_request_id=f"order-{i}-first", evidence="POST /v1/orders reused the idempotency_key of an earlier order",
    ) for i, r in enumerate(failed)]
    detections += [
        MisuseDetection(detection_id="polling-too-fast:poll-1", rule="polling-too-fast", code="POLLING_TOO_FAST",
                        user_id=failed[0].user_id, account_id=failed[0].account_id, at_us=failed[0].received_at_us,
                        request_id="poll-20", earlier_request_id="poll-1", evidence="GET /v1/orders/{id} called 20 times"),
        MisuseDetection(detection_id="polling-too-fast:drill-1", rule="polling-too-fast", code="POLLING_TOO_FAST",
                        user_id="drill-user", at_us=failed[0].received_at_us, request_id="drill-1", drill=True),
    ]
    traced = [msgspec.structs.replace(r, diagnosed_at_us=r.diagnosed_at_us + US, diagnosis=Diagnosis(
        cls="client_misuse", service=r.diagnosis.service, code=d.code, surfaced_as=r.diagnosis.cls,
        misuse_detection_id=d.detection_id)) for r, d in zip(failed[:2], detections)]
    return detections, traced


@dataclass
class Loaded:
    client: Any
    time_range: TimeRange
    requests: list[CorrelatedRequest]
    reports: list[FaultReport]
    incidents: list[IncidentEvent]
    notices: list[Notification]
    changes: list[Change]  # the ones the annotation shows, as last posted
    detections: list[MisuseDetection]
    traced: list[DiagnosedReport]


@pytest.fixture(scope="module")
def loaded(clickhouse_target, tmp_path_factory) -> Iterator[Loaded]:
    # Two days ago and yesterday, at 04:00 UTC: in the past whatever the hour, and within every retention.
    today_us = time.time_ns() // 1000 // DAY_US * DAY_US
    first, second = today_us - 2 * DAY_US + 4 * 3600 * US, today_us - DAY_US + 4 * 3600 * US
    world = build_world(SEED, USERS)
    outage = _run("service-outage", first, world)
    # cut at 60 % of the run: the ISP outage (20 %–80 %) is declared and still open
    isp = _run("isp-outage", second, world, until_fraction=0.6)
    settings, client = own_database(clickhouse_target.dsn, tmp_path_factory.mktemp("dashboards-state"))
    notices, attempts, diagnosed = [], [], []
    for run in (outage, isp):
        by_id = {r.request_id: r for r in run.requests}
        insert_records(client, "requests", run.requests)
        insert_records(client, "fault-reports", run.reports)
        run_diagnosed = [diagnose_report(r, by_id.get(primary_request_id(r)), CATALOG, r.received_at_us + US)
                         for r in run.reports]
        insert_records(client, "reports-diagnosed", run_diagnosed)
        diagnosed += run_diagnosed
        insert_records(client, "surges", run.out.surges)
        insert_records(client, "incidents", run.out.incidents)
        insert_records(client, "behaviour", run.behaviour)  # the funnels panel's (issue #18)
        run_notices, run_attempts = _vip_outbox(run, world)
        notices += run_notices
        attempts += run_attempts
    insert_records(client, "surges", _canary(first + 600 * US))
    detections, traced = _misuse(diagnosed)
    insert_records(client, "misuse-detections", detections)
    insert_records(client, "reports-diagnosed", traced)
    insert_records(client, "notifications", notices)
    insert_records(client, "deliveries", attempts)
    posts, reposts, shown = _changes(first, second)
    insert_records(client, "changes", posts)
    insert_records(client, "changes", reposts)
    latest = {c.change_id: c for c in posts + reposts}
    span = TimeRange((first - 3600 * US) // 1000, (second + DURATION_S * US + 3600 * US) // 1000, 60_000)
    yield Loaded(client, span, outage.requests + isp.requests, outage.reports + isp.reports,
                 outage.out.incidents + isp.out.incidents, notices,
                 sorted((latest[i] for i in shown), key=lambda c: (c.started_at_us, c.change_id)),
                 detections, traced)
    client.command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")


def test_the_simulation_gives_every_panel_something_to_show(loaded):
    transitions = {(e.incident_id, e.transition) for e in loaded.incidents}
    declared = {i for i, t in transitions if t == "declared"}
    resolved = {i for i, t in transitions if t == "resolved"}
    assert len(declared) == 2 and len(resolved) == 1, transitions
    assert loaded.notices and loaded.reports
    assert any(r.diagnosis.cls != "ok" for r in loaded.requests)


def _query(loaded: Loaded, sql: Sql, variables: dict[str, Selection]) -> tuple[list[str], list[tuple]]:
    text = expand(sql.text, loaded.time_range, variables)
    result = loaded.client.query(text)
    rows = [tuple(row) for row in result.result_rows]
    if not rows:  # the embedded engine names no columns for an empty answer: ask ClickHouse what they would be
        return [r[0] for r in loaded.client.query(f"DESCRIBE ({text})").result_rows], rows
    return list(result.column_names), rows


def _all_selected(dashboard: Dashboard) -> dict[str, Selection]:
    return {v.name: Selection((), all=True) for v in dashboard.variables}


def _queries() -> Iterator[Any]:
    for dashboard in DASHBOARDS:
        for where, sql in dashboard.sql():
            yield pytest.param(dashboard, sql, id=f"{dashboard.uid}: {where}")


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch; clickhouse-connect gives UTC columns as naive datetimes."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _check_shape(sql: Sql, columns: list[str], rows: list[tuple], span: TimeRange) -> None:
    assert columns == list(sql.columns)
    if sql.time_series:
        interval_s = span.interval_ms // 1000
        for row in rows:
            assert isinstance(row[0], datetime)
            assert span.from_ms // 1000 - interval_s <= _epoch(row[0]) <= span.to_ms // 1000
            # a long frame: labels are strings, values numbers (Grafana pivots on the labels)
            assert all(isinstance(v, (int, float)) or isinstance(v, str) for v in row[1:])
            assert any(isinstance(v, (int, float)) for v in row[1:])


@pytest.mark.parametrize(("dashboard", "sql"), list(_queries()))
def test_every_query_runs_and_returns_the_columns_its_panel_reads(clickhouse, loaded, dashboard, sql):
    columns, rows = _query(loaded, sql, _all_selected(dashboard))
    _check_shape(sql, columns, rows, loaded.time_range)
    assert rows, "the simulated outages give this query rows: an empty answer means a wrong query"


@pytest.mark.parametrize(("dashboard", "sql"), list(_queries()))
def test_every_query_runs_with_chosen_variable_values(clickhouse, loaded, dashboard, sql):
    # two real values of each variable (from the variable's own query), as a person would pick them
    chosen = {}
    for variable in dashboard.variables:
        _, values = _query(loaded, variable.query, _all_selected(dashboard))
        chosen[variable.name] = Selection(tuple(str(v[0]) for v in values[:2]))
    columns, rows = _query(loaded, sql, chosen)
    _check_shape(sql, columns, rows, loaded.time_range)


def _panel(uid: str, title: str) -> Sql:
    [dashboard] = [d for d in DASHBOARDS if d.uid == uid]
    [panel] = [p for p in dashboard.panels if p.title == title]
    [query] = panel.queries
    assert isinstance(query, Sql)
    return query


def test_a_chosen_region_keeps_only_that_region(clickhouse, loaded):
    sql = _panel("supportlens-problem-trends", "Top problems by region")
    _, every = _query(loaded, sql, {"region": Selection((), all=True), "service": Selection((), all=True),
                                    "app_version": Selection((), all=True)})
    region = every[0][0]
    _, rows = _query(loaded, sql, {"region": Selection((region,)), "service": Selection((), all=True),
                                   "app_version": Selection((), all=True)})
    assert rows and {r[0] for r in rows} == {region}
    assert len({r[0] for r in every}) > 1


def test_trend_counts_match_the_simulation(clickhouse, loaded):
    everything = {"region": Selection((), all=True), "service": Selection((), all=True),
                  "app_version": Selection((), all=True)}
    failed = [r for r in loaded.requests if r.diagnosis.cls != "ok"]
    _, [(count,)] = _query(loaded, _panel("supportlens-problem-trends", "Failed requests"), everything)
    _, [(users,)] = _query(loaded, _panel("supportlens-problem-trends", "Affected users"), everything)
    _, [(share,)] = _query(loaded, _panel("supportlens-problem-trends", "Share of requests failed"), everything)
    # uniq is exact at these sizes, give or take its hashing: allow 1 %
    assert count == pytest.approx(len(failed), rel=0.01)
    assert users == pytest.approx(len({r.user_id for r in failed if r.user_id}), rel=0.01)
    assert share == pytest.approx(len(failed) / len(loaded.requests), rel=0.02)


def test_report_rate_adds_up_and_its_baseline_is_the_week_before(clickhouse, loaded):
    sql = _panel("supportlens-surges", "Fault reports vs their 7-day baseline")
    _, rows = _query(loaded, sql, {"region": Selection((), all=True), "app_version": Selection((), all=True)})
    minutes_per_interval = loaded.time_range.interval_ms / 60_000
    assert sum(r[1] for r in rows) * minutes_per_interval == pytest.approx(len(loaded.reports))
    # the first day's reports are the second day's baseline: each counts 1/7 one day later
    first_day = loaded.time_range.from_ms // 1000 + 86_400 + 3600
    later = [r for r in rows if _epoch(r[0]) >= first_day - 3600]
    first_day_reports = [r for r in loaded.reports if r.received_at_us < loaded.time_range.from_ms * 1000 + DAY_US]
    assert sum(r[2] for r in later) * minutes_per_interval * 7 == pytest.approx(len(first_day_reports))


def test_open_incidents_show_the_incident_still_open(clickhouse, loaded):
    declared = {e.incident_id for e in loaded.incidents if e.transition == "declared"}
    resolved = {e.incident_id for e in loaded.incidents if e.transition == "resolved"}
    everything = {"service": Selection((), all=True)}
    _, rows = _query(loaded, _panel("supportlens-incidents", "Open incidents"), everything)
    assert [r[0] for r in rows] == sorted(declared - resolved)
    _, [(count,)] = _query(loaded, _panel("supportlens-incidents", "Incidents open now"), everything)
    assert count == 1


def _annotation(uid: str, name: str) -> Sql:
    [dashboard] = [d for d in DASHBOARDS if d.uid == uid]
    [annotation] = [a for a in dashboard.annotations if a.name == name]
    return annotation.query


def test_incident_annotations_span_each_incident_and_say_what_it_is(clickhouse, loaded):
    annotation = _annotation("supportlens-incidents", "Incidents")
    _, rows = _query(loaded, annotation, {})
    latest = {e.incident_id: e for e in sorted(loaded.incidents, key=lambda e: e.sequence)}
    assert len(rows) == len(latest)
    for time_, time_end, title, text, tags in rows:
        incident = latest[title.split(" ")[0]]
        assert _epoch(time_) == incident.started_at_us / US
        assert _epoch(time_end) == (incident.resolved_at_us / US if incident.resolved_at_us
                                        else loaded.time_range.to_ms / 1000)
        assert text == f"{incident.title}: {incident.reason}"
        assert incident.severity in tags.split(",")


def test_every_dashboard_over_time_marks_the_changes_of_its_range(clickhouse, loaded):
    with_changes = {d.uid for d in DASHBOARDS if any(a.name == "Changes" for a in d.annotations)}
    assert with_changes == {d.uid for d in all_dashboards() if any(p.kind == "timeseries" for p in d.panels)}
    for uid in sorted(with_changes):
        _, rows = _query(loaded, _annotation(uid, "Changes"), {})
        # the drill and the change over before the range are left out; a re-post replaced its first post
        assert [row[2] for row in rows] == [f"{c.change_id} ({c.kind})" for c in loaded.changes], uid
        for (time_, time_end, _, text, tags), change in zip(rows, loaded.changes):
            assert _epoch(time_) == change.started_at_us / US
            assert _epoch(time_end) == (change.finished_at_us or change.started_at_us) / US
            # the words `supportlens changes add` prints, then the description and the link
            assert text.split("\n") == [describe(change), *(p for p in (change.description, change.link) if p)]
            assert tags.split(",") == [t for t in (change.kind, change.service, change.region, change.version) if t]
    deploy = next(c for c in loaded.changes if c.kind == "deploy")
    assert describe(deploy) == "payment 1.4.1 → 1.4.2 deployed in eu-west by ann"


def test_affected_vip_accounts_show_each_notice_and_its_last_attempt(clickhouse, loaded):
    sql = _panel("supportlens-incidents", "Affected VIP accounts")
    columns, rows = _query(loaded, sql, {"service": Selection((), all=True)})
    assert len(rows) == len(loaded.notices)
    assert all(r[columns.index("last_outcome")] == ("pending" if r[columns.index("channel")] == "none" else "delivered")
               for r in rows)


def test_misuse_panels_show_each_detection_and_the_reports_traced_to_it(clickhouse, loaded):
    everything = {"region": Selection((), all=True), "service": Selection((), all=True),
                  "app_version": Selection((), all=True)}
    shown = [d for d in loaded.detections if not d.drill]
    _, by_code = _query(loaded, _panel("supportlens-problem-trends", "Misuse found in sequences"), everything)
    assert sum(r[2] for r in by_code) == len(shown) and {r[1] for r in by_code} == {d.code for d in shown}
    columns, rows = _query(loaded, _panel("supportlens-problem-trends", "Latest misuse found in sequences"), everything)
    table = {r[columns.index("request_id")]: dict(zip(columns, r)) for r in rows}
    assert sorted(table) == sorted(d.request_id for d in shown)
    traced = {r.diagnosis.misuse_detection_id for r in loaded.traced}
    for d in shown:
        row = table[d.request_id]
        assert (row["code"], row["user_id"], row["account_id"]) == (d.code, d.user_id, d.account_id)
        assert (row["reports_traced"], row["surfaced_as"]) == ((1, "server_error") if d.detection_id in traced
                                                               else (0, ""))
    _, by_trace = _query(loaded, _panel("supportlens-problem-trends", "Fault reports traced to misuse"), everything)
    assert {r[1] for r in by_trace} == {"IDEMPOTENCY_KEY_REUSED as server_error"}
    assert sum(r[2] for r in by_trace) == len(loaded.traced)
