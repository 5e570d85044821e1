"""Records → ClickHouse rows (pure): every mapped topic, and what cannot be stored."""

from __future__ import annotations

import pytest

from sinks.clickhouse_rows import MAPPINGS, RecordMeta, spans_landing_json, to_landing_json, to_row
from sinks.clickhouse_sink import backoff_delay
from span_factory import T0, client, server
from supportlens.contracts import (
    BehaviourEvent,
    CorrelatedRequest,
    DeliveryAttempt,
    IncidentEvent,
    Notification,
    SurgeEvent,
    DiagnosedReport,
    Diagnosis,
    FaultReport,
    Hop,
    InvalidRecord,
    MisuseDetection,
    Network,
    encode,
)

META = RecordMeta(partition=2, offset=41, timestamp_ms=1_763_784_000_123, key=b"k")


def _row(topic: str, record) -> dict:
    return dict(zip(MAPPINGS[topic].columns, to_row(topic, encode(record), META, 1_048_576)))


def test_every_column_of_every_table_gets_a_value():
    for topic, mapping in MAPPINGS.items():
        assert len(set(mapping.columns)) == len(mapping.columns), topic


def test_span_row_flattens_network_and_stringifies_attributes():
    span = client(network=Network(isp="China Mobile", asn=9808, connection_type="wifi"),
                  attributes={"retry": 2, "cached": True, "screen": "cart"})
    row = _row("client-spans", span)
    assert row["start"] == T0 and row["isp"] == "China Mobile" and row["asn"] == 9808
    assert row["attributes"] == {"retry": "2", "cached": "true", "screen": "cart"}
    assert row["http_status"] == 201 and row["client_ip"] == "203.0.113.7"
    server_row = _row("server-spans", server("payment", "s1", "c1", 5, 40, http_status=None))
    assert server_row["http_status"] == 0 and server_row["side"] == "server"


def test_request_row_keeps_diagnosis_and_hops():
    request = CorrelatedRequest(
        request_id="r1", version=3, start_us=T0, client_ip="203.0.113.7", has_client=True, has_server=True,
        teams=["payments"], hops=[Hop(service="payment", offset_us=5000, duration_us=40_000, status="error")],
        diagnosis=Diagnosis(cls="server_error", service="payment", team="payments", code="PAYMENT_UNAVAILABLE"),
    )
    row = _row("requests", request)
    assert row["version"] == 3 and row["diagnosis_class"] == "server_error" and row["diagnosis_team"] == "payments"
    assert '"service":"payment"' in row["hops"] and row["teams"] == ["payments"]


def test_report_and_diagnosis_rows():
    report = FaultReport(report_id="rep1", received_at_us=T0, client_ip="203.0.113.7", request_ids=["r1"],
                         user_message="付款一直失败", client_log=[client()])
    row = _row("fault-reports", report)
    assert row["client_log_spans"] == 1 and row["request_ids"] == ["r1"] and row["user_message"] == "付款一直失败"
    diagnosed = DiagnosedReport(report_id="rep1", received_at_us=T0, diagnosed_at_us=T0 + 5, client_ip="203.0.113.7",
                                diagnosis=Diagnosis(cls="network_unreachable"), title="t", locale="zh-CN")
    row = _row("reports-diagnosed", diagnosed)
    assert row["diagnosis_class"] == "network_unreachable" and row["locale"] == "zh-CN"
    assert (row["diagnosis_surfaced_as"], row["misuse_detection_id"]) == ("", "")


def test_a_traced_diagnosis_keeps_what_it_surfaced_as_and_its_detection():
    traced = DiagnosedReport(report_id="rep1", received_at_us=T0, diagnosed_at_us=T0 + 9, client_ip="203.0.113.7",
                             diagnosis=Diagnosis(cls="client_misuse", service="payment", code="IDEMPOTENCY_KEY_REUSED",
                                                 surfaced_as="server_error",
                                                 misuse_detection_id="idempotency-key-reuse:r2"))
    row = _row("reports-diagnosed", traced)
    assert (row["diagnosis_class"], row["diagnosis_code"], row["diagnosis_surfaced_as"], row["misuse_detection_id"]) \
        == ("client_misuse", "IDEMPOTENCY_KEY_REUSED", "server_error", "idempotency-key-reuse:r2")


def test_misuse_detection_row():
    detection = MisuseDetection(detection_id="idempotency-key-reuse:r2", rule="idempotency-key-reuse",
                                code="IDEMPOTENCY_KEY_REUSED", user_id="u1", account_id="acct-1", at_us=T0,
                                request_id="r2", earlier_request_id="r1", evidence="reused key k-7")
    row = _row("misuse-detections", detection)
    assert (row["detection_id"], row["at"], row["request_id"], row["earlier_request_id"]) == (
        "idempotency-key-reuse:r2", T0, "r2", "r1")
    assert (row["session_id"], row["detected_at"], row["drill"]) == ("", 0, False)


def test_behaviour_row():
    event = BehaviourEvent(event_id="e1", user_id="u1", ts_us=T0, name="tap", attributes={"x": 1.5})
    assert _row("behaviour", event)["attributes"] == {"x": "1.5"}


def test_dead_letter_row_reads_its_origin_from_headers():
    meta = RecordMeta(0, 7, 1_763_784_000_000, b"key", [
        ("reason", b"field `start_us`: expected int"), ("source_topic", b"p.client-spans"),
        ("source_partition", b"1"), ("source_offset", b"99"),
    ])
    row = dict(zip(MAPPINGS["dlq"].columns, to_row("dlq", b"\xff{not json", meta, 1024)))
    assert (row["source_topic"], row["source_partition"], row["source_offset"]) == ("p.client-spans", 1, 99)
    assert row["reason"].startswith("field `start_us`") and row["value"].endswith("{not json")
    with pytest.raises(InvalidRecord, match="source_topic"):
        to_row("dlq", b"x", RecordMeta(0, 8, 0, None, [("reason", b"r")]), 1024)


@pytest.mark.parametrize("topic, value, fragment", [
    ("client-spans", b'{"request_id": "r1"}', "side"),
    ("requests", b"not json", "not valid JSON"),
    ("fault-reports", b'{"report_id": "x", "received_at_us": 1, "client_ip": "999.1.1.1"}', "client_ip"),
    ("behaviour", None, "no value"),
    ("misuse-detections", b'{"detection_id": "d1", "rule": "r", "code": "C"}', "at_us"),
    ("misuse-detections", b'{"detection_id": "", "rule": "r", "code": "C", "at_us": 1}', "detection_id"),
])
def test_invalid_records_name_the_problem(topic, value, fragment):
    with pytest.raises(InvalidRecord, match=fragment):
        to_row(topic, value, META, 1_048_576)


def test_backoff_grows_and_is_capped():
    assert backoff_delay(1, rng=lambda: 1.0) < backoff_delay(3, rng=lambda: 1.0) < backoff_delay(20, rng=lambda: 1.0)
    assert backoff_delay(50, rng=lambda: 1.0) <= 30.05
    assert backoff_delay(5, rng=lambda: 0.0) == pytest.approx(0.05)


def test_surge_incident_notification_and_delivery_rows():
    surge = _row("surges", SurgeEvent(surge_id="sg1", phase="start", at_us=T0, started_at_us=T0, dimension="service",
                                       value="payment", score=0.93, affected_users=120))
    assert (surge["dimension"], surge["value"], surge["phase"], surge["affected_users"]) == ("service", "payment", "start", 120)
    incident = _row("incidents", IncidentEvent(
        incident_id="inc-1", sequence=2, transition="resolved", at_us=T0 + 9, started_at_us=T0, resolved_at_us=T0 + 9,
        severity="sev2", reason="rates at baseline for 10 minutes", root_key="service=payment",
        dimensions={"service": "payment"}, teams=["payments"]))
    assert incident["resolved_at"] == T0 + 9 and incident["dimensions"] == {"service": "payment"}
    notice = _row("notifications", Notification(notification_id="inc-1:acct-7:incident_declared", account_id="acct-7",
                                                kind="incident_declared", created_at_us=T0, locale="zh-CN"))
    assert notice["locale"] == "zh-CN" and notice["kind"] == "incident_declared"
    attempt = _row("deliveries", DeliveryAttempt(notification_id="n1", attempt=2, account_id="acct-7", at_us=T0,
                                                 channel="webhook", outcome="failed", detail="HTTP 503"))
    assert (attempt["attempt"], attempt["outcome"]) == (2, "failed")
    with pytest.raises(InvalidRecord, match="score"):
        to_row("surges", b'{"surge_id":"s","phase":"start","at_us":1,"started_at_us":1,"dimension":"service",'
                         b'"value":"x","score":1.5}', META, 1024)


def test_landing_json_is_the_validated_record_with_unknown_fields_in_attributes():
    raw = (b'{"request_id":"r1","side":"server","service":"api","start_us":1,"duration_us":2,"status":"ok",'
           b'"k8s.pod":"api-7","attributes":{"x":1}}')
    line = to_landing_json("server-spans", raw, 1024)
    assert b"\n" not in line and b'"attributes":{"x":1,"k8s.pod":"api-7"}' in line
    with pytest.raises(InvalidRecord, match="diagnosis.cls"):
        to_landing_json("requests", b'{"request_id":"r1","start_us":1,"diagnosis":{"cls":"nope"}}', 1024)


def test_a_span_batch_lands_its_good_spans_and_names_each_bad_one_by_position():
    good = b'{"request_id":"r%d","side":"client","service":"app","start_us":1,"duration_us":2,"status":"ok"}'
    batch = b"[" + b",".join([good % 1, b'{"request_id":7}', good % 2]) + b"]"
    landed = spans_landing_json(batch, 4096)
    assert landed.count == 2 and [line.count(b'"request_id":"r') for line in landed.lines.split(b"\n")] == [1, 1]
    ((position, reason, value),) = landed.rejected
    assert (position, value) == (1, b'{"request_id":7}') and reason.startswith("span [1] of the batch: ")
    assert spans_landing_json(good % 3, 4096).count == 1  # a one-span record, as older producers write it
    with pytest.raises(InvalidRecord, match="not valid JSON"):
        spans_landing_json(b"[{", 4096)
