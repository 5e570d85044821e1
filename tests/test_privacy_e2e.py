"""Consent and IP anonymization, end to end on real parts.

Two users of one app send client spans through the gateway, one with tracing consent
and one without; the backend traces both of their requests. After the real worker and
the ClickHouse sink have written everything, every column of every table is searched:
the non-consenting user's client spans are nowhere, and no full client address is stored
anywhere while anonymization is on.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from helpers import WorkerProcess
from sinks.clickhouse_sink import ClickHouseSink
from supportlens import contracts, store
from supportlens.config import load_settings
from supportlens.contracts import Span
from supportlens.metrics import Metrics
from supportlens.topics import provision
from test_gateway_http import otlp_request, post_json
from test_gateway_kafka import kafka_gateway

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

CONSENTING_IP, WITHHOLDING_IP = "203.0.113.77", "198.51.100.23"
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5"}


def _client_span(request_id: str, span_id: str, user: str, start_ns: int) -> dict:
    return {"traceId": uuid.uuid4().hex, "spanId": span_id, "name": "POST /v1/payments/confirm",
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(start_ns + 300_000_000),
            "attributes": [{"key": "http.request_id", "value": {"stringValue": request_id}},
                           {"key": "enduser.id", "value": {"stringValue": user}}]}


def _server_span(request_id: str, user: str, start_us: int) -> Span:
    return Span(request_id=request_id, span_id=uuid.uuid4().hex[:16], side="server", service="payment",
                operation="POST /pay", start_us=start_us + 20_000, duration_us=200_000, status="ok",
                http_status=200, user_id=user)


def _holding(client, needle: str) -> list[str]:
    """Every ``table.column`` of the database in which some row contains ``needle``."""
    columns = client.query(
        "SELECT table, name FROM system.columns WHERE database = currentDatabase() "
        "AND table IN (SELECT name FROM system.tables WHERE database = currentDatabase() AND engine NOT LIKE '%View')"
    ).result_rows
    found = []
    for table, column in columns:
        hits = client.query(f"SELECT count() FROM `{table}` WHERE position(toString(`{column}`), %(n)s) > 0",
                            parameters={"n": needle}).result_rows[0][0]
        if hits:
            found.append(f"{table}.{column}")
    return found


def test_no_client_span_of_a_non_consenting_user_and_no_full_ip_lands_anywhere(kafka, clickhouse, tmp_path):
    settings = load_settings(
        kafka_bootstrap=kafka.bootstrap, topic_prefix=f"p{uuid.uuid4().hex[:8]}.", partitions=3,
        clickhouse_dsn=clickhouse.dsn, clickhouse_database=f"t_{uuid.uuid4().hex[:10]}",
        sink_batch_rows=200, sink_flush_s=0.2, anonymize_client_ips=True, trusted_proxies=("127.0.0.1/32",),
    )
    provision(settings)
    client = store.connect(settings)
    store.migrate(client, settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    stop = threading.Event()
    sink = ClickHouseSink(settings, store.connect(settings), Metrics(CollectorRegistry()), stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    now_ns = time.time_ns()
    consenting = {"user": f"u-yes-{uuid.uuid4().hex[:6]}", "request": f"r-yes-{uuid.uuid4()}", "span": "a1a1a1a1a1a1a1a1"}
    withholding = {"user": f"u-no-{uuid.uuid4().hex[:6]}", "request": f"r-no-{uuid.uuid4()}", "span": "b2b2b2b2b2b2b2b2"}
    try:
        with kafka_gateway(settings) as url:
            for who, ip, consent in ((consenting, CONSENTING_IP, "granted"), (withholding, WITHHOLDING_IP, "denied")):
                body = otlp_request([_client_span(who["request"], who["span"], who["user"], now_ns)],
                                    **{"service.name": "shop-app", "supportlens.consent": consent})
                answer = post_json(f"{url}/v1/traces", body, {"X-Forwarded-For": ip})
                assert answer.status == 200, answer.body
            report = post_json(f"{url}/v1/reports", {"user_id": consenting["user"], "locale": "en",
                                                     "request_ids": [consenting["request"]], "error_code": "E1"},
                               {"X-Forwarded-For": CONSENTING_IP})
            assert report.status == 202, report.body
        producer = Producer(settings.producer_config())
        for who in (consenting, withholding):  # the backend traces both requests: it needs no consent
            producer.produce(settings.topic("server-spans"), key=who["request"].encode(),
                             value=contracts.encode(_server_span(who["request"], who["user"], now_ns // 1000)))
        assert producer.flush(30) == 0

        deadline = time.monotonic() + 120
        while True:  # both requests correlated and stored, the report diagnosed and stored
            stored = client.query("SELECT uniqExact(request_id) FROM requests WHERE request_id IN %(ids)s",
                                  parameters={"ids": [consenting["request"], withholding["request"]]}).result_rows[0][0]
            reports = client.query("SELECT count() FROM report_diagnoses").result_rows[0][0]
            if stored == 2 and reports == 1:
                break
            assert time.monotonic() < deadline, (stored, reports, worker.tail())
            time.sleep(1.0)
        time.sleep(2.0)  # one more flush: a late copy would land now
    finally:
        stop.set()
        thread.join(30)
        worker.stop()

    # the consenting user's client span is stored, with its address cut to the network
    rows = client.query("SELECT side, client_ip FROM spans WHERE span_id = %(s)s",
                        parameters={"s": consenting["span"]}).result_rows
    assert [(side, str(ip)) for side, ip in rows] == [("client", "203.0.113.0")]
    assert _holding(client, consenting["span"])  # the search finds what is there
    # the non-consenting user's client span is nowhere; their request is known from the server side only
    assert _holding(client, withholding["span"]) == []
    assert _holding(client, WITHHOLDING_IP) == []
    sides = client.query("SELECT side FROM spans WHERE request_id = %(r)s",
                         parameters={"r": withholding["request"]}).result_rows
    assert sides == [("server",)]
    # no full address of anyone, in any table: spans, requests, fault reports, diagnoses
    assert _holding(client, CONSENTING_IP) == []
    assert "fault_reports.client_ip" in _holding(client, "203.0.113.0")
