"""The whole loop on real parts: OpenTelemetry SDK → gateway → Kafka → worker → the user's status URL."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from opentelemetry.trace import SpanKind, Status, StatusCode

from helpers import WorkerProcess
from supportlens.config import load_settings
from supportlens.contracts import CorrelatedRequest, decode
from supportlens.topic_reader import read_range
from supportlens.topics import provision
from test_gateway_http import call, post_json
from test_gateway_kafka import kafka_gateway, provider

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("encoding", ["protobuf-gzip", "json"])
def test_sdk_spans_correlate_into_one_request_and_a_report_is_answered_in_the_users_language(kafka, tmp_path, encoding):
    settings = load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"e{uuid.uuid4().hex[:8]}.", partitions=3,
                             correlation_grace_s=2, correlation_settle_s=0.5)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log").wait_ready()
    request_id = f"req-{uuid.uuid4()}"
    try:
        with kafka_gateway(settings) as url:
            app = provider(encoding, url, **{"service.name": "shop-app", "service.version": "5.3.1",
                                             "os.type": "ios", "supportlens.consent": "granted"})
            backend = provider(encoding, url, **{"service.name": "payment", "supportlens.side": "server"})
            with app.get_tracer("shop").start_as_current_span(
                    "POST /v1/payments/confirm", kind=SpanKind.CLIENT, attributes={"http.request_id": request_id}) as client:
                with backend.get_tracer("payment").start_as_current_span(
                        "POST /pay", kind=SpanKind.SERVER,
                        attributes={"http.request_id": request_id, "http.response.status_code": 503,
                                    "error.type": "PAYMENT_UNAVAILABLE"}) as server:
                    server.set_status(Status(StatusCode.ERROR, "db-7.payments.internal: connection refused"))
                client.set_attribute("http.response.status_code", 502)
                client.set_status(Status(StatusCode.ERROR))
            for traced in (app, backend):
                traced.shutdown()

            # the user taps "report a problem": the app sends its recent client log
            start_us = time.time_ns() // 1000
            answer = post_json(f"{url}/v1/reports", {
                "user_id": "user-42", "locale": "zh-CN", "request_ids": [request_id],
                "client_log": [{"request_id": request_id, "side": "client", "service": "shop-app",
                                "start_us": start_us - 1_000_000, "duration_us": 800_000, "status": "error",
                                "http_status": 502, "span_id": f"{client.get_span_context().span_id:016x}"}],
            })
            assert answer.status == 202, answer.body
            status_url = json.loads(answer.body)["status_url"]
            deadline = time.monotonic() + 60
            while (status := call("GET", status_url)).status != 200:
                assert status.status == 202, status.body  # pending until the worker answered
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.5)
    finally:
        worker.stop()

    told = json.loads(status.body)
    assert told["status"] == "diagnosed" and told["diagnosis"] == "server_error"
    assert told["title"] == "我们的支付服务出现故障"
    assert "internal" not in told["explanation"] + told["action"]  # no host names reach the user
    requests = [decode(m.value(), CorrelatedRequest) for m in read_range(settings, [settings.topic("requests")])]
    latest = max((r for r in requests if r.request_id == request_id), key=lambda r: r.version)
    assert (latest.has_client, latest.has_server, latest.completeness) == (True, True, "complete")
    assert (latest.diagnosis.cls, latest.diagnosis.service, latest.diagnosis.team) == ("server_error", "payment", "payments")
    assert latest.client_ip == "127.0.0.1" and latest.platform == "ios"
