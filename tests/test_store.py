"""The ClickHouse store on real ClickHouse: migrations, deduplication, trends, the support lookups
(CLI functions and HTTP API) and hostile lookup input.

Runs on the embedded engine here; on a server when ``CLICKHOUSE_URL`` is set or Docker answers.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from rich.console import Console

from sinks.clickhouse_rows import MAPPINGS, RecordMeta, to_landing_json, to_row
from span_factory import client, server
from supportlens import store
from supportlens.contracts import (
    CorrelatedRequest,
    DiagnosedReport,
    Diagnosis,
    FaultReport,
    Hop,
    IncidentEvent,
    MisuseDetection,
    Network,
    encode,
)
from supportlens.errors import UserError
from supportlens.store import lookup
from supportlens.support import render
from supportlens.support.access import DirectSupport
from supportlens.support.api import build_support_app

pytestmark = pytest.mark.clickhouse
HOUR_US = 3_600_000_000
# Recent times: rows older than a table's retention would be dropped on their way in.
T0 = (time.time_ns() // 1000 // HOUR_US - 2) * HOUR_US
NOW = T0 + HOUR_US


def _client_span(**kw):
    return client(**{"start_us": T0, **kw})


def _server_span(service, span_id, parent, start_ms, duration_ms, **kw):
    return server(service, span_id, parent, start_ms, duration_ms, **{"start_us": T0 + int(start_ms * 1000), **kw})


@pytest.fixture
def db(store_settings):
    client = store.connect(store_settings)
    store.migrate(client, store_settings)
    yield client
    client.command(f"DROP DATABASE IF EXISTS `{store_settings.clickhouse_database}`")


def _insert(client, topic: str, records) -> None:
    mapping = MAPPINGS[topic]
    rows = [to_row(topic, encode(r), RecordMeta(0, i, 0), 1_048_576) for i, r in enumerate(records)]
    client.insert(mapping.table, rows, column_names=mapping.columns)


def _request(request_id: str, cls: str = "ok", ip: str = "203.0.113.7", start: int = T0, version: int = 1,
             service: str = "payment", user: str = "u1") -> CorrelatedRequest:
    return CorrelatedRequest(
        request_id=request_id, version=version, start_us=start, client_ip=ip, user_id=user, account_id="acct-1",
        operation="POST /v1/payments/confirm", root_service="edge-gateway", has_client=True, has_server=True,
        region="cn-east", diagnosis=Diagnosis(cls=cls, service=service if cls != "ok" else ""),
        server_status="error" if cls == "server_error" else "ok",
    )


def test_migrations_are_numbered_recorded_and_idempotent(db, store_settings):
    names = [f"{m.number:04d}_{m.name}" for m in store.migrations()]
    assert names[0] == "0001_spans" and len(names) >= 7
    recorded = [r[0] for r in db.query("SELECT number FROM schema_migrations FINAL ORDER BY number").result_rows]
    assert recorded == [m.number for m in store.migrations()]
    assert store.migrate(db, store_settings) == []  # nothing left to do
    tables = {r[0] for r in db.query("SELECT name FROM system.tables WHERE database = currentDatabase()").result_rows}
    assert set(store.DATA_TABLES) | {"request_index", "customer_timeline", "top_problems"} <= tables


def test_a_changed_migration_is_refused(db, store_settings, monkeypatch):
    original = store.migrations()
    changed = store.Migration(1, "spans", original[0].sql + "\n-- edited")
    monkeypatch.setattr(store, "migrations", lambda: (changed, *original[1:]))
    with pytest.raises(UserError, match="0001_spans was changed"):
        store.migrate(db, store_settings)


def test_retention_follows_configuration(db, store_settings):
    engine = dict(db.query("SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()").result_rows)
    assert "toIntervalDay(14)" in engine["spans"] and "toIntervalDay(365)" in engine["fault_reports"]
    shorter = store_settings.model_copy(update={"clickhouse_ttl_days": {**store_settings.clickhouse_ttl_days,
                                                                        "spans": 3, "behaviour": 0}})
    assert store.apply_retention(db, shorter) == ["spans: keep 3 days", "behaviour: keep forever"]
    assert store.apply_retention(db, shorter) == []
    engine = dict(db.query("SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()").result_rows)
    assert "toIntervalDay(3)" in engine["spans"] and " TTL " not in engine["behaviour"]


def test_landing_tables_map_json_exactly_as_the_python_rows_do(db):
    """The sink's fast path (JSON parsed by ClickHouse, mapped by a view) and the typed Python
    mapping give the same row, field for field."""
    records = {
        "client-spans": [_client_span(network=Network(isp="China Mobile", asn=9808, connection_type="wifi"),
                                      attributes={"retry": 2, "cached": True, "screen": "cart"}, status="error",
                                      http_status=502, error_message="line\nbreak"),
                         _server_span("payment", "s1", "c1", 5, 40, http_status=None)],
        "requests": [CorrelatedRequest(
            request_id="r1", version=3, start_us=T0, client_ip="203.0.113.7", has_client=True, has_server=True,
            teams=["payments"], hops=[Hop(service="payment", offset_us=5000, duration_us=40_000, status="error")],
            client_http_status=502, diagnosis=Diagnosis(cls="server_error", service="payment", team="payments",
                                                        code="PAYMENT_UNAVAILABLE", catalog_version=1))],
    }
    for topic, items in records.items():
        mapping = MAPPINGS[topic]
        lines = [to_landing_json(topic, encode(r), 1_048_576) for r in items]
        db.raw_insert(mapping.landing, insert_block=b"\n".join(lines), fmt="JSONEachRow")
        columns = [c for c in mapping.columns if c != "start"]
        stored = db.query(f"SELECT {', '.join(columns)}, toUnixTimestamp64Micro(start) FROM {mapping.table} "
                          "ORDER BY 1, 2").result_rows
        expected = sorted((to_row(topic, encode(r), RecordMeta(0, 0, 0), 1_048_576) for r in items),
                          key=lambda row: (row[0], row[1]))
        for row, want in zip(stored, expected, strict=True):
            named = dict(zip(mapping.columns, want))
            assert dict(zip([*columns, "start"], row)) == named


def test_redelivered_rows_are_one_row_and_the_highest_version_wins(db):
    spans = [_client_span(), _server_span("payment", "s1", "c1", 5, 40)]
    _insert(db, "client-spans", spans)
    _insert(db, "client-spans", spans)  # the sink crashed before its commit: the batch comes again
    _insert(db, "requests", [_request("r1", "server_error", ip="", version=2)])
    _insert(db, "requests", [_request("r1", "server_error", version=3), _request("r1", "server_error", version=3)])
    counts = store.table_counts(db)
    assert counts.rows["spans"] == 2 and counts.stored["spans"] == 4
    assert counts.rows["requests"] == 1
    assert db.query("SELECT client_ip, version FROM requests FINAL").result_rows == [("203.0.113.7", 3)]
    db.command("OPTIMIZE TABLE spans FINAL")
    assert store.table_counts(db).stored["spans"] == 2
    # trends count each request once, however often it was written
    assert db.query("SELECT uniqMerge(requests) FROM problem_trends").result_rows == [(1,)]


def _sample(db) -> None:
    _insert(db, "requests", [
        _request("r-ok", start=T0 - 10 * HOUR_US),
        _request("r-fail", "server_error", start=T0),
        _request("r-other", "server_error", ip="198.51.100.1", user="u2", start=T0),
        _request("r-old", "server_error", start=T0 - 48 * HOUR_US),
    ])
    _insert(db, "client-spans", [_client_span(request_id="r-fail", span_id="c9", status="error", http_status=502)])
    _insert(db, "server-spans", [_server_span("edge-gateway", "g1", "c9", 5, 50, request_id="r-fail"),
                                 _server_span("payment", "p1", "g1", 8, 40, request_id="r-fail", status="error",
                                        http_status=503, error_code="PAYMENT_UNAVAILABLE")])
    _insert(db, "fault-reports", [FaultReport(report_id="rep-1", received_at_us=T0 + 60_000_000, user_id="u1",
                                              client_ip="203.0.113.7", request_ids=["r-fail"],
                                              user_message="付款一直失败")])
    _insert(db, "reports-diagnosed", [DiagnosedReport(
        report_id="rep-1", received_at_us=T0 + 60_000_000, diagnosed_at_us=T0 + 61_000_000, user_id="u1",
        client_ip="203.0.113.7", diagnosis=Diagnosis(cls="server_error", service="payment"),
        title="我们的支付服务出现故障", locale="zh-CN")])


def test_timeline_of_a_client(db):
    _sample(db)
    result = lookup.timeline(db, "ip", "203.0.113.7", NOW - 24 * HOUR_US, NOW)
    assert [(e.kind, e.id) for e in result.entries] == [("report", "rep-1"), ("request", "r-fail"), ("request", "r-ok")]
    assert (result.requests, result.failed, result.reports) == (2, 1, 1)
    assert result.entries[0].detail == "我们的支付服务出现故障" and result.entries[1].service == "payment"
    by_user = lookup.timeline(db, "user", "u2", NOW - 24 * HOUR_US, NOW)
    assert [e.id for e in by_user.entries] == ["r-other"]
    assert lookup.timeline(db, "account", "acct-1", NOW - 72 * HOUR_US, NOW).requests == 4


def _incident(sequence: int, transition: str, service: str, resolved: int | None = None, drill: bool = False,
              incident_id: str = ""):
    return IncidentEvent(incident_id=incident_id or f"inc-{service}", sequence=sequence, transition=transition,
                         at_us=T0, started_at_us=T0 - HOUR_US, resolved_at_us=resolved, severity="sev2",
                         title=f"{service} failing", reason="2 owner teams needed", root_key=f"service={service}",
                         dimensions={"service": service}, drill=drill)


def test_the_timeline_names_the_incidents_a_customer_fell_into(db):
    _sample(db)
    _insert(db, "incidents", [
        _incident(1, "declared", "payment"), _incident(2, "resolved", "payment", resolved=T0 + HOUR_US // 2),
        _incident(1, "declared", "search"),  # another service: not theirs
        _incident(1, "declared", "payment", drill=True, incident_id="drill-1"),  # a drill is nobody's incident
    ])
    result = lookup.timeline(db, "ip", "203.0.113.7", NOW - 24 * HOUR_US, NOW)
    assert [(i.incident_id, i.state, i.requests) for i in result.incidents] == [("inc-payment", "resolved", 1)]
    state = db.query("SELECT state, last_sequence FROM incidents_current WHERE incident_id = 'inc-payment'").result_rows
    assert state == [("resolved", 2)]


def test_call_chain_is_a_waterfall_from_the_first_span(db):
    _sample(db)
    chain = lookup.request_chain(db, "r-fail")
    assert chain.found and chain.diagnosis_class == "server_error" and chain.reports == ["rep-1"]
    assert [(s.side, s.service, s.offset_us) for s in chain.spans] == [
        ("client", "mobile-app", 0), ("server", "edge-gateway", 5000), ("server", "payment", 8000)]
    assert chain.spans[2].error_code == "PAYMENT_UNAVAILABLE"
    assert not lookup.request_chain(db, "nope").found


def test_report_detail_and_top_problems(db):
    _sample(db)
    report = lookup.report_detail(db, "rep-1")
    assert report.diagnosed and report.user_message == "付款一直失败" and report.request_ids == ["r-fail"]
    top = lookup.top_problems(db, "service", NOW - 24 * HOUR_US, NOW)
    assert [(r.diagnosis_class, r.value, r.requests, r.users) for r in top.rows] == [("server_error", "payment", 2, 2)]
    assert top.rows[0].share == pytest.approx(2 / 3)


HOSTILE = [
    "203.0.113.7' OR '1'='1", "'; DROP TABLE requests; --", "x" * 100_000, "", " ", "1.2.3.4.5", "::g",
    "{key:String}", "\x00", "203.0.113.7\n",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_lookup_input_is_refused_or_finds_nothing(db, value):
    _sample(db)
    for kind in ("ip", "user", "account"):
        try:
            result = lookup.timeline(db, kind, value, NOW - 24 * HOUR_US, NOW)
        except lookup.LookupInputError as exc:
            assert exc.message and "Exception" not in exc.message
        else:
            assert kind == "ip" and value.strip() == "203.0.113.7" or result.entries == []
    for call in (lookup.request_chain, lookup.report_detail):
        try:
            assert not call(db, value).found
        except lookup.LookupInputError:
            pass
    assert store.table_counts(db).rows["requests"] == 4  # nothing was dropped


@pytest.mark.parametrize("text, message", [
    ("24", "not a duration"), ("-1h", "not a duration"), ("999d", "out of range"), ("1h; DROP", "not a duration"),
])
def test_bad_durations(text, message):
    with pytest.raises(lookup.LookupInputError, match=message):
        lookup.parse_duration(text)


def test_until_accepts_now_iso_and_ago():
    assert lookup.parse_until("now", now_us=NOW) == NOW
    assert lookup.parse_until("2h", now_us=NOW) == NOW - 2 * HOUR_US
    assert lookup.parse_until("2025-11-22T03:20:00Z") == 1_763_781_600_000_000
    with pytest.raises(lookup.LookupInputError, match="not a time"):
        lookup.parse_until("yesterday-ish")


def test_support_api_answers_json_and_refuses_bad_input_with_400(db):
    _sample(db)

    async def scenario():
        app = build_support_app(DirectSupport(db), CollectorRegistry())
        async with TestClient(TestServer(app)) as http:
            ok = await http.get("/v1/timeline", params={"ip": "203.0.113.7", "since_us": NOW - 24 * HOUR_US,
                                                        "until_us": NOW})
            body = await ok.json()
            assert ok.status == 200 and [e["id"] for e in body["entries"]] == ["rep-1", "r-fail", "r-ok"]
            chain = await (await http.get("/v1/request", params={"id": "r-fail"})).json()
            assert len(chain["spans"]) == 3
            for params in ({"ip": "1' OR 1=1"}, {"user": "u1", "ip": "1.2.3.4"}, {"ip": "1.2.3.4", "since": "lots"},
                           {"ip": "1.2.3.4", "limit": "many"}):
                bad = await http.get("/v1/timeline", params=params)
                payload = await bad.json()
                assert bad.status == 400 and payload["error"] and "Traceback" not in await bad.text()
            bad_top = await http.get("/v1/top", params={"by": "region; DROP TABLE spans"})
            assert bad_top.status == 400 and "cannot group by" in (await bad_top.json())["error"]
            tables = await (await http.get("/v1/tables")).json()
            assert tables["rows"]["requests"] == 4

    asyncio.run(scenario())


# --- misuse found in sequences (issue #18): detections, traced reports, their lookups ---------

MISUSE_AT = T0 - 5 * 60_000_000  # the misusing order: five minutes before the payment failed


def _detection(**kw) -> MisuseDetection:
    return MisuseDetection(**{
        "detection_id": "idempotency-key-reuse:r-order-2", "rule": "idempotency-key-reuse",
        "code": "IDEMPOTENCY_KEY_REUSED", "user_id": "u1", "account_id": "acct-1", "at_us": MISUSE_AT,
        "request_id": "r-order-2", "earlier_request_id": "r-order-1", "session_id": "sess-1",
        "evidence": "POST /v1/orders at 08:00:00 reused the idempotency_key k-7 of request r-order-1 "
                    "(07:59:10) with another body_sha256",
        "detected_at_us": MISUSE_AT + 1_000, **kw})


def _traced(report: DiagnosedReport, detection: MisuseDetection) -> DiagnosedReport:
    """The report as the sequence worker re-emits it: the misuse, the symptom kept (streams/sequences.trace)."""
    seen = report.diagnosis
    return msgspec.structs.replace(report, diagnosed_at_us=report.diagnosed_at_us + 30_000_000, diagnosis=Diagnosis(
        cls="client_misuse", service=seen.service, code=detection.code, surfaced_as=seen.cls,
        misuse_detection_id=detection.detection_id, evidence=f"{detection.evidence}; later it surfaced as {seen.cls}",
    ), title="This order reused another order's idempotency key")


def _misuse_sample(db) -> MisuseDetection:
    """_sample's payment failure, reported, then traced to a misuse made before the lookup window."""
    _sample(db)
    detection = _detection()
    [untraced] = [DiagnosedReport(
        report_id="rep-1", received_at_us=T0 + 60_000_000, diagnosed_at_us=T0 + 61_000_000, user_id="u1",
        account_id="acct-1", client_ip="203.0.113.7", diagnosis=Diagnosis(cls="server_error", service="payment"),
        title="我们的支付服务出现故障", locale="zh-CN")]
    _insert(db, "misuse-detections", [detection, detection])  # a restarted worker wrote it again
    _insert(db, "reports-diagnosed", [_traced(untraced, detection)])
    _insert(db, "reports-diagnosed", [untraced])  # the symptom's diagnosis, re-delivered late: still older
    _insert(db, "misuse-detections", [_detection(detection_id="polling-too-fast:r-poll-1", rule="polling-too-fast",
                                                 code="POLLING_TOO_FAST", at_us=T0 + 120_000_000,
                                                 request_id="r-poll-20", earlier_request_id="r-poll-1"),
                                      _detection(detection_id="polling-too-fast:r-poll-9", user_id="u2",
                                                 account_id="acct-2", at_us=T0, request_id="r-poll-9")])
    return detection


def _text(renderable) -> str:
    console = Console(record=True, width=400, color_system=None)
    console.print(renderable)
    return " ".join(console.export_text().split())


def test_a_detection_is_one_row_and_a_traced_diagnosis_replaces_the_symptom(db):
    _misuse_sample(db)
    assert store.table_counts(db).rows["misuse_detections"] == 3
    rows = db.query("SELECT diagnosis_class, diagnosis_code, diagnosis_surfaced_as, misuse_detection_id "
                    "FROM report_diagnoses FINAL WHERE report_id = 'rep-1'").result_rows
    assert rows == [("client_misuse", "IDEMPOTENCY_KEY_REUSED", "server_error", "idempotency-key-reuse:r-order-2")]
    # the support views of 0007, re-created: the trace of a report, and misuse in a customer's story
    view = db.query("SELECT diagnosis_class, diagnosis_surfaced_as, misuse_detection_id FROM fault_reports_diagnosed "
                    "WHERE report_id = 'rep-1'").result_rows
    assert view == [("client_misuse", "server_error", "idempotency-key-reuse:r-order-2")]
    story = db.query("SELECT kind, id, what, detail FROM customer_timeline WHERE user_id = 'u1' "
                     "AND kind IN ('misuse', 'report') ORDER BY at").result_rows
    assert [(kind, id_) for kind, id_, _, _ in story] == [
        ("misuse", "idempotency-key-reuse:r-order-2"), ("report", "rep-1"), ("misuse", "polling-too-fast:r-poll-1")]
    assert story[0][2] == "misuse: IDEMPOTENCY_KEY_REUSED (idempotency-key-reuse)"
    assert story[1][3].endswith("(traced to idempotency-key-reuse:r-order-2, surfaced as server_error)")


def test_a_traced_report_names_the_earlier_misuse_it_follows_from(db):
    detection = _misuse_sample(db)
    report = lookup.report_detail(db, "rep-1")
    assert (report.diagnosis_class, report.diagnosis_code, report.surfaced_as) == (
        "client_misuse", "IDEMPOTENCY_KEY_REUSED", "server_error")
    assert report.misuse is not None and report.misuse.detection_id == detection.detection_id
    text = _text(render.report_view(report))
    assert ("traced to earlier misuse: IDEMPOTENCY_KEY_REUSED (idempotency-key-reuse) at "
            f"{render.when(MISUSE_AT)}, request r-order-2 — it surfaced as server_error") in text
    assert "reused the idempotency_key k-7 of request r-order-1" in text
    # the report's new diagnosis may land before its detection does: the trace still shows
    db.command("TRUNCATE TABLE misuse_detections")
    pending = lookup.report_detail(db, "rep-1")
    assert pending.misuse is None and pending.misuse_detection_id == detection.detection_id
    assert ("earlier misuse: IDEMPOTENCY_KEY_REUSED (detection idempotency-key-reuse:r-order-2, not stored yet) "
            "— it surfaced as server_error") in _text(render.report_view(pending))
    untraced = lookup.report_detail(db, "rep-1")
    assert "traced to" not in _text(render.report_view(msgspec.structs.replace(untraced, misuse_detection_id="")))


def test_the_timeline_lists_the_misuse_a_customer_made(db):
    _misuse_sample(db)
    since = T0 - 60_000_000  # after the misuse: it is shown because a report of the window follows from it
    by_user = lookup.timeline(db, "user", "u1", since, NOW)
    assert [(m.detection_id, m.reports) for m in by_user.misuse] == [
        ("polling-too-fast:r-poll-1", 0), ("idempotency-key-reuse:r-order-2", 1)]
    [traced] = [e for e in by_user.entries if e.kind == "report"]
    assert (traced.diagnosis_class, traced.surfaced_as) == ("client_misuse", "server_error")
    by_account = lookup.timeline(db, "account", "acct-2", NOW - 24 * HOUR_US, NOW)
    assert [m.detection_id for m in by_account.misuse] == ["polling-too-fast:r-poll-9"]
    by_ip = lookup.timeline(db, "ip", "203.0.113.7", NOW - 24 * HOUR_US, NOW)  # through the users seen from it
    assert [m.user_id for m in by_ip.misuse] == ["u1", "u1"]
    text = _text(render.timeline_table(by_user))
    assert ("misuse found: IDEMPOTENCY_KEY_REUSED (idempotency-key-reuse) at "
            f"{render.when(MISUSE_AT)}, request r-order-2, user u1 · account acct-1, explains 1 fault report") in text
    assert "client_misuse (surfaced as server_error)" in text
    assert lookup.timeline(db, "user", "u3", NOW - 24 * HOUR_US, NOW).misuse == []


def test_the_support_api_gives_the_misuse_with_the_timeline_and_the_report(db):
    _misuse_sample(db)

    async def scenario():
        app = build_support_app(DirectSupport(db), CollectorRegistry())
        async with TestClient(TestServer(app)) as http:
            body = await (await http.get("/v1/timeline", params={"account": "acct-1", "since_us": NOW - 24 * HOUR_US,
                                                                 "until_us": NOW})).json()
            assert [m["code"] for m in body["misuse"]] == ["POLLING_TOO_FAST", "IDEMPOTENCY_KEY_REUSED"]
            report = await (await http.get("/v1/report", params={"id": "rep-1"})).json()
            assert report["surfaced_as"] == "server_error" and report["misuse"]["request_id"] == "r-order-2"

    asyncio.run(scenario())


def test_a_store_from_before_0013_keeps_its_diagnoses_and_gains_the_trace(store_settings, monkeypatch):
    client = store.connect(store_settings)
    every = store.migrations()
    monkeypatch.setattr(store, "migrations", lambda: every[:12])
    monkeypatch.setattr(store, "TTL_COLUMNS", {k: v for k, v in store.TTL_COLUMNS.items() if k != "misuse_detections"})
    store.migrate(client, store_settings)
    old = [c for c in MAPPINGS["reports-diagnosed"].columns if c not in ("diagnosis_surfaced_as", "misuse_detection_id")]
    row = dict(zip(MAPPINGS["reports-diagnosed"].columns, to_row("reports-diagnosed", encode(DiagnosedReport(
        report_id="rep-old", received_at_us=T0, diagnosed_at_us=T0 + 1, client_ip="203.0.113.7",
        diagnosis=Diagnosis(cls="server_error"))), RecordMeta(0, 0, 0), 1_048_576)))
    client.insert("report_diagnoses", [[row[c] for c in old]], column_names=old)
    monkeypatch.undo()
    try:
        assert store.migrate(client, store_settings)[0] == "0013_misuse_detections"
        assert client.query("SELECT diagnosis_class, diagnosis_surfaced_as, misuse_detection_id "
                            "FROM report_diagnoses FINAL").result_rows == [("server_error", "", "")]
        assert lookup.report_detail(client, "rep-old").misuse is None
    finally:
        client.command(f"DROP DATABASE IF EXISTS `{store_settings.clickhouse_database}`")
