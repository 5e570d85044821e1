"""The gateway against the session's real Kafka broker, fed by the real OpenTelemetry Python SDK."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import Producer
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from helpers import free_port, settings_env, spans_in_records, supportlens_cmd
from supportlens.gateway.ingest import OutRecord
from supportlens import contracts
from supportlens.config import Settings
from supportlens.contracts import DiagnosedReport, Diagnosis, FaultReport, Span
from supportlens.gateway.server import serve
from supportlens.topic_reader import end_offsets, read_range
from supportlens.topics import provision
from test_gateway_http import call, post_json, serving

pytestmark = pytest.mark.kafka

SPAN_TOPICS = ("client-spans", "server-spans")


@contextmanager
def kafka_gateway(settings: Settings) -> Iterator[str]:
    """A gateway on a free loopback port, exactly as ``supportlens gateway`` runs it; yields its URL."""
    port = free_port()
    settings = settings.model_copy(update={"gateway_port": port})
    with serving(lambda stop: serve(settings, stop), port):
        yield f"http://127.0.0.1:{port}"


def landed(settings: Settings, since, names=SPAN_TOPICS) -> dict[str, list[tuple[str, bytes]]]:
    """(key, value) of every record on ``names`` after the offsets ``since``."""
    out: dict[str, list[tuple[str, bytes]]] = {name: [] for name in names}
    logical = {settings.topic(name): name for name in names}
    for message in read_range(settings, since, end_offsets(settings, list(logical))):
        out[logical[message.topic()]].append((message.key().decode(), message.value()))
    return out


def spans_on(records: list[tuple[str, bytes]]) -> list[Span]:
    # batch records, each keyed by its first span's request id
    return spans_in_records([OutRecord("", key, value) for key, value in records])


class OtlpJsonExporter(SpanExporter):
    """OTLP/HTTP in its JSON encoding, which the Python SDK does not ship: the SDK's own
    protobuf encoder, then protobuf's JSON mapping with ids re-written in hex as OTLP/JSON wants."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.statuses: list[int] = []

    def export(self, spans: list[ReadableSpan]) -> SpanExportResult:
        message = encode_spans(spans)
        payload = MessageToDict(message)
        for r, resource_spans in enumerate(message.resource_spans):
            for s, scope_spans in enumerate(resource_spans.scope_spans):
                for i, span in enumerate(scope_spans.spans):
                    out = payload["resourceSpans"][r]["scopeSpans"][s]["spans"][i]
                    out["traceId"], out["spanId"] = span.trace_id.hex(), span.span_id.hex()
                    if span.parent_span_id:
                        out["parentSpanId"] = span.parent_span_id.hex()
        answer = post_json(self.endpoint, payload)
        self.statuses.append(answer.status)
        return SpanExportResult.SUCCESS if answer.status == 200 else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def exporter(encoding: str, url: str) -> SpanExporter:
    if encoding == "json":
        return OtlpJsonExporter(f"{url}/v1/traces")
    return OTLPSpanExporter(f"{url}/v1/traces", compression=Compression.Gzip, timeout=10)


def provider(encoding: str, url: str, **resource: str) -> TracerProvider:
    traced = TracerProvider(resource=Resource.create(resource))
    traced.add_span_processor(BatchSpanProcessor(exporter(encoding, url)))
    return traced


@pytest.mark.parametrize("encoding", ["protobuf-gzip", "json"])
def test_spans_from_the_opentelemetry_sdk_land_on_both_sides_sharing_the_request_id(settings, encoding):
    provision(settings)
    since = end_offsets(settings, [settings.topic(name) for name in SPAN_TOPICS])
    with kafka_gateway(settings) as url:
        app = provider(encoding, url, **{"service.name": "shop-app", "service.version": "5.2.0",
                                         "os.type": "android", "supportlens.consent": "granted"})
        backend = provider(encoding, url, **{"service.name": "payment", "supportlens.side": "server"})
        quiet = provider(encoding, url, **{"service.name": "quiet-app"})  # the user did not consent
        attributes = {"http.request_id": f"req-{encoding}"}
        with app.get_tracer("shop").start_as_current_span("POST /checkout", kind=SpanKind.CLIENT,
                                                          attributes=attributes) as client_span:
            with backend.get_tracer("payment").start_as_current_span(
                    "POST /pay", kind=SpanKind.SERVER,
                    attributes={**attributes, "http.response.status_code": 503}) as server_span:
                server_span.set_status(Status(StatusCode.ERROR, "upstream timeout"))
        with quiet.get_tracer("quiet").start_as_current_span("GET /home", attributes={"http.request_id": "req-quiet"}):
            pass
        for traced in (app, backend, quiet):
            traced.shutdown()  # exports what is left, synchronously
    seen = landed(settings, since)
    (client,) = spans_on(seen["client-spans"])
    (server,) = spans_on(seen["server-spans"])
    assert client.request_id == server.request_id == f"req-{encoding}"
    assert (client.side, client.service, client.app_version) == ("client", "shop-app", "5.2.0")
    assert client.platform == "android"
    assert (server.side, server.service, server.status, server.http_status) == ("server", "payment", "error", 503)
    assert server.error_message == "upstream timeout"
    assert (client.client_ip, server.client_ip) == ("127.0.0.1", "")
    assert client.trace_id == f"{client_span.get_span_context().trace_id:032x}"  # hex, not base64
    assert server.span_id == f"{server_span.get_span_context().span_id:016x}"
    assert server.parent_span_id == client.span_id


def test_a_report_stores_its_attached_spans_even_without_tracing_consent(settings):
    provision(settings)
    names = ("client-spans", "fault-reports")
    since = end_offsets(settings, [settings.topic(name) for name in names])
    log = [{"request_id": f"req-{i}", "side": "client", "service": "quiet-app", "start_us": 1_700_000_000_000_000 + i,
            "duration_us": 30_000_000, "status": "error", "error_code": "TIMEOUT"} for i in range(3)]
    with kafka_gateway(settings) as url:
        answer = post_json(f"{url}/v1/reports", {"user_id": "u7", "locale": "en", "request_ids": ["req-2"],
                                                 "client_log": log, "client_ip": "6.6.6.6", "received_at_us": 1})
    assert answer.status == 202
    report_id = answer.json()["report_id"]
    seen = landed(settings, since, names)
    attached = spans_on(seen["client-spans"])
    assert [s.request_id for s in attached] == ["req-0", "req-1", "req-2"]
    assert {s.attributes["attached_to_report"] for s in attached} == {report_id}
    ((key, value),) = seen["fault-reports"]
    report = contracts.decode(value, FaultReport)
    assert (key, report.report_id, report.client_ip, len(report.client_log)) == (report_id, report_id, "127.0.0.1", 3)
    assert report.received_at_us > 1_600_000_000_000_000  # the gateway's clock, not the client's


def _diagnose(settings: Settings, report_id: str, **fields) -> None:
    diagnosed = DiagnosedReport(report_id=report_id, received_at_us=1, diagnosed_at_us=2,
                                diagnosis=Diagnosis(cls="server_error", service="payment", team="payments"), **fields)
    _produce_diagnosed(settings, report_id, contracts.encode(diagnosed))


def _produce_diagnosed(settings: Settings, key: str, value: bytes) -> None:
    producer = Producer(settings.producer_config())
    producer.produce(settings.topic("reports-diagnosed"), key=key.encode(), value=value)
    assert producer.flush(10) == 0


def _status_when(url: str, wanted: int, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        answer = call("GET", url)
        if answer.status == wanted or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def test_report_status_goes_from_pending_to_diagnosed_in_the_users_language(settings):
    provision(settings)
    # diagnosed before this gateway started: a restarted gateway still answers it, skipping what does not decode
    _produce_diagnosed(settings, "earlier-report", b'{"report_id": "earlier-report", "diagnosis": "bad"}')
    _diagnose(settings, "earlier-report", locale="en", title="A payment service is failing")
    with kafka_gateway(settings) as url:
        accepted = post_json(f"{url}/v1/reports", {"user_id": "u1", "locale": "zh-CN", "error_code": "PAY_503"})
        assert accepted.status == 202
        status_url = accepted.json()["status_url"]
        assert status_url == f"{url}/v1/reports/{accepted.json()['report_id']}"
        pending = call("GET", status_url)
        assert (pending.status, pending.json()["status"]) == (202, "pending")
        _diagnose(settings, accepted.json()["report_id"], locale="zh-CN", title="支付服务暂时不可用",
                  explanation="不是您的网络问题。", action="请稍后重试。", doc_url="https://help.example.com/pay")
        diagnosed = _status_when(status_url, 200)
        earlier = _status_when(f"{url}/v1/reports/earlier-report", 200)
        unknown = call("GET", f"{url}/v1/reports/no-such-report")
    assert diagnosed.status == 200, diagnosed.body
    assert diagnosed.json() == {
        "report_id": accepted.json()["report_id"], "status": "diagnosed", "diagnosis": "server_error",
        "title": "支付服务暂时不可用", "explanation": "不是您的网络问题。", "action": "请稍后重试。",
        "doc_url": "https://help.example.com/pay", "locale": "zh-CN"}
    assert (earlier.status, earlier.json()["title"]) == (200, "A payment service is failing")
    assert (unknown.status, unknown.json()) == (404, {"error": "unknown report id 'no-such-report'"})


def test_the_gateway_command_serves_until_sigterm_and_leaves_nothing_unsent(settings):
    provision(settings)
    since = end_offsets(settings, [settings.topic("behaviour")])
    port = free_port()
    env = {**settings_env(settings), "SUPPORTLENS_GATEWAY_PORT": str(port)}
    process = subprocess.Popen(supportlens_cmd("gateway"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = call("GET", f"{url}/healthz")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.1)
        assert (health.status, health.json()) == (200, {"status": "ok"})
        stored = post_json(f"{url}/v1/behaviour", [{"event_id": "e1", "user_id": "u1", "ts_us": 1, "name": "tap"}],
                           {"X-Supportlens-Consent": "granted"})
        assert stored.json() == {"accepted": 1, "dropped_without_consent": 0}
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "gateway stopped cleanly" in stderr and "behaviour_stored=1" in stderr
    assert "WARNING supportlens.gateway.server: no API keys file: the gateway accepts data from any client" in stderr
    assert "Traceback" not in stderr
    (behaviour,) = landed(settings, since, ("behaviour",))["behaviour"]
    assert behaviour[0] == "u1"


def test_the_gateway_command_refuses_to_start_without_its_topics(settings):
    done = subprocess.run(supportlens_cmd("gateway"), env=settings_env(settings), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "missing topics" in done.stderr and "supportlens topics create" in done.stderr
    assert "Traceback" not in done.stderr
