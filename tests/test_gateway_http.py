"""The gateway over real HTTP on a loopback port, storing into memory: every endpoint, every way to get it wrong.

The harness here (a server on its own thread and event loop, a small HTTP client) is
also used by ``test_gateway_kafka.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from helpers import free_port, spans_in_records
from supportlens import contracts
from supportlens.config import Settings, load_settings
from supportlens.contracts import DiagnosedReport, Diagnosis, Span
from supportlens.gateway.app import build_app, public_base_url
from supportlens.gateway.ingest import OutRecord
from supportlens.gateway.producer import StorageUnavailable
from supportlens.gateway.server import open_site
from supportlens.gateway.status import ReportBook
from supportlens.metrics import Metrics

LIMIT = 4096  # max_record_bytes of these tests (the smallest the settings allow is 1024)


# --- harness -----------------------------------------------------------------------------


@contextmanager
def serving(main: Callable[[asyncio.Event], Awaitable[Any]], port: int) -> Iterator[None]:
    """Run ``main(stop)`` on a thread with its own event loop until the block ends; wait for ``port``."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(main(stop))
        except BaseException as exc:  # handed to the test below
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="gateway-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not _accepts(port):
        if failure or not thread.is_alive() or time.monotonic() > deadline:
            thread.join(5)
            raise failure[0] if failure else RuntimeError("the gateway did not start listening")
        time.sleep(0.02)
    try:
        yield
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the gateway did not stop"
        if failure:
            raise failure[0]


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def call(
    method: str, url: str, body: bytes | Iterable[bytes] | None = None, headers: dict[str, str] | None = None
) -> Answer:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            answer = Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        answer = Answer(exc.code, exc.headers, exc.read())
    assert b"Traceback" not in answer.body
    return answer


def post_json(url: str, value: Any, headers: dict[str, str] | None = None) -> Answer:
    return call("POST", url, msgspec.json.encode(value), {"Content-Type": "application/json", **(headers or {})})


def otlp_span(request_id: str, name: str = "GET /pay") -> dict[str, Any]:
    return {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "name": name,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000250000000",
            "attributes": [{"key": "http.request_id", "value": {"stringValue": request_id}}]}


def otlp_request(spans: list[dict[str, Any]], **resource: str) -> dict[str, Any]:
    attributes = [{"key": k, "value": {"stringValue": v}} for k, v in resource.items()]
    return {"resourceSpans": [{"resource": {"attributes": attributes}, "scopeSpans": [{"spans": spans}]}]}


CONSENTED_APP = {"service.name": "shop-app", "supportlens.consent": "granted"}


# --- a gateway storing into memory -------------------------------------------------------


@dataclass
class MemorySink:
    records: list[OutRecord] = field(default_factory=list)
    failure: BaseException | None = None
    up: bool = True

    async def send_all(self, records):
        if self.failure is not None:
            raise self.failure
        self.records.extend(records)

    async def reachable(self) -> bool:
        return self.up

    def on(self, topic: str) -> list[OutRecord]:
        return [record for record in self.records if record.topic == topic]


@dataclass
class Served:
    url: str
    sink: MemorySink
    book: ReportBook
    settings: Settings
    registry: CollectorRegistry


@pytest.fixture
def gateway(monkeypatch, tmp_path):
    """Start a gateway storing into memory: ``with gateway(anonymize_client_ips=True) as served: …``."""
    for key in [k for k in __import__("os").environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)

    @contextmanager
    def start(**overrides: Any) -> Iterator[Served]:
        port = free_port()
        settings = load_settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="t.", state_dir=tmp_path,
                                 gateway_port=port, max_record_bytes=LIMIT, **overrides)
        served = Served(f"http://127.0.0.1:{port}", MemorySink(), ReportBook(), settings, CollectorRegistry())
        ids = iter(f"report-{n}" for n in range(1, 1000))

        async def main(stop: asyncio.Event) -> None:
            app = build_app(settings, served.sink, served.book, clock_us=lambda: 1_700_000_000_000_000,
                            new_report_id=lambda: next(ids), metrics=Metrics(served.registry))
            runner = await open_site(app, "127.0.0.1", port)
            await stop.wait()
            await runner.cleanup()

        with serving(main, port):
            yield served

    return start


# --- traces ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, forwarded, expected_ip", [
    ({}, {}, "127.0.0.1"),
    ({}, {"X-Forwarded-For": "203.0.113.7"}, "127.0.0.1"),  # loopback is no trusted proxy here
    ({"trusted_proxies": ("127.0.0.0/8",)}, {"X-Forwarded-For": "1.1.1.1, 203.0.113.7"}, "203.0.113.7"),
    ({"trusted_proxies": ("127.0.0.0/8",), "anonymize_client_ips": True}, {"X-Forwarded-For": "203.0.113.7"},
     "203.0.113.0"),
    ({"anonymize_client_ips": True}, {}, "127.0.0.0"),
])
def test_client_spans_carry_the_callers_address_as_configured(gateway, overrides, forwarded, expected_ip):
    with gateway(**overrides) as served:
        answer = post_json(f"{served.url}/v1/traces", otlp_request([otlp_span("req-1")], **CONSENTED_APP), forwarded)
    assert (answer.status, answer.json()) == (200, {})
    (record,) = served.sink.on("client-spans")
    (span,) = spans_in_records([record])
    assert (record.key, span.side, span.service, span.client_ip) == ("req-1", "client", "shop-app", expected_ip)


def test_partly_bad_batches_answer_otlp_partial_success(gateway):
    bad = dict(otlp_span("req-2"), startTimeUnixNano="soon")
    with gateway() as served:
        answer = call("POST", f"{served.url}/v1/traces",
                      gzip.compress(msgspec.json.encode(otlp_request([otlp_span("req-1"), bad], **CONSENTED_APP))),
                      {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        unconsented = post_json(f"{served.url}/v1/traces", otlp_request([otlp_span("req-3")], **{"service.name": "x"}))
    assert answer.status == 200
    assert answer.json()["partialSuccess"]["rejectedSpans"] == 1
    assert "spans[1]: `startTimeUnixNano` is not an integer" in answer.json()["partialSuccess"]["errorMessage"]
    assert unconsented.json()["partialSuccess"]["rejectedSpans"] == 1
    assert "supportlens.consent" in unconsented.json()["partialSuccess"]["errorMessage"]
    assert [r.key for r in served.sink.records] == ["req-1"]


# --- reports -----------------------------------------------------------------------------


def test_a_report_is_accepted_pending_then_diagnosed_and_unknown_ids_are_404(gateway):
    with gateway(gateway_public_url="https://support.example.com/") as served:
        accepted = post_json(f"{served.url}/v1/reports", {"user_id": "u1", "locale": "zh-CN", "client_ip": "9.9.9.9"})
        assert accepted.status == 202
        assert accepted.json() == {"report_id": "report-1",
                                   "status_url": "https://support.example.com/v1/reports/report-1"}
        pending = call("GET", f"{served.url}/v1/reports/report-1")
        assert (pending.status, pending.json()["status"]) == (202, "pending")
        served.book.add_diagnoses([DiagnosedReport(
            report_id="report-1", received_at_us=1, diagnosed_at_us=2, locale="zh-CN",
            diagnosis=Diagnosis(cls="network_unreachable"), title="网络无法连接", action="请检查网络")])
        diagnosed = call("GET", f"{served.url}/v1/reports/report-1")
        unknown = call("GET", f"{served.url}/v1/reports/nobody-knows")
    assert diagnosed.status == 200
    assert (diagnosed.json()["diagnosis"], diagnosed.json()["title"]) == ("network_unreachable", "网络无法连接")
    assert (unknown.status, unknown.json()) == (404, {"error": "unknown report id 'nobody-knows'"})
    (report,) = served.sink.on("fault-reports")
    assert contracts.decode(report.value, contracts.FaultReport).client_ip == "127.0.0.1"


@pytest.mark.parametrize("overrides, expected", [
    ({"gateway_host": "::1", "gateway_port": 9000}, "http://[::1]:9000"),
    ({"gateway_host": "gw.internal", "gateway_port": 80}, "http://gw.internal:80"),
    ({"gateway_public_url": "https://support.example.com/api/"}, "https://support.example.com/api"),
])
def test_status_links_point_where_clients_reach_the_gateway(overrides, expected):
    assert public_base_url(Settings(**overrides)) == expected


# --- behaviour ---------------------------------------------------------------------------


def test_behaviour_is_stored_only_with_the_consent_header(gateway):
    events = [{"event_id": f"e{i}", "user_id": "u1", "ts_us": 1, "name": "tap"} for i in range(3)]
    with gateway() as served:
        without = post_json(f"{served.url}/v1/behaviour", events)
        denied = post_json(f"{served.url}/v1/behaviour", events, {"X-Supportlens-Consent": "denied"})
        granted = post_json(f"{served.url}/v1/behaviour", events[0], {"X-Supportlens-Consent": "granted"})
    assert (without.status, without.json()) == (202, {"accepted": 0, "dropped_without_consent": 3})
    assert denied.json()["dropped_without_consent"] == 3
    assert (granted.status, granted.json()) == (202, {"accepted": 1, "dropped_without_consent": 0})
    assert [(r.topic, r.key) for r in served.sink.records] == [("behaviour", "u1")]


# --- every way to get it wrong ------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}
BOMB = gzip.compress(b"{" + b" " * 3_000_000, 9)  # ~3 kB that inflates to 3 MB
assert len(BOMB) < LIMIT


@pytest.mark.parametrize("method, path, body, headers, status, message", [
    # traces
    ("POST", "/v1/traces", b"\x0a\x05hello", PROTOBUF, 400, "not a protobuf ExportTraceServiceRequest"),
    ("POST", "/v1/traces", b'{"resourceSpans": [', JSON, 400, "body is not valid JSON"),
    ("POST", "/v1/traces", b'{"resourceSpans": {}}', JSON, 400, "`resourceSpans` must be a list"),
    ("POST", "/v1/traces", b"{}", {"Content-Type": "text/plain"}, 415,
     "Content-Type must be application/x-protobuf or application/json, got 'text/plain'"),
    ("POST", "/v1/traces", b"x" * (LIMIT + 1), PROTOBUF, 413, "request body is larger than the limit of 4,096 bytes"),
    ("POST", "/v1/traces", BOMB, {**JSON, "Content-Encoding": "gzip"}, 413,
     "gzip-decompressed request body is larger than the limit of 4,096 bytes"),
    ("POST", "/v1/traces", b"{}", {**JSON, "Content-Encoding": "gzip"}, 400, "body is not valid gzip data"),
    ("POST", "/v1/traces", b"{}", {**JSON, "Content-Encoding": "zstd"}, 415,
     "Content-Encoding 'zstd' is not supported"),
    # found by fuzzing: both were answered 500
    ("POST", "/v1/traces", b'{"\x80": 1}', JSON, 400, "body is not valid JSON (it holds bytes that are not UTF-8"),
    ("POST", "/v1/traces", b"[" * 2000 + b"]" * 2000, JSON, 400, "body is nested too deeply"),
    ("GET", "/v1/traces", None, {}, 405, "method GET is not allowed on /v1/traces; use POST"),
    # reports
    ("POST", "/v1/reports", b"{broken", JSON, 400, "body is not valid JSON"),
    ("POST", "/v1/reports", b"[]", JSON, 400, "a fault report must be a JSON object, got an array"),
    ("POST", "/v1/reports", b'{"request_ids": "r1"}', JSON, 400,
     "invalid fault report: field `request_ids`: expected `array`, got `str`"),
    ("POST", "/v1/reports", b'{"client_log": [{"side": "client"}]}', JSON, 400,
     "field `client_log[0]`: object missing required field `request_id`"),
    ("POST", "/v1/reports", b"{}", {}, 415,
     "Content-Type must be application/json, got 'application/x-www-form-urlencoded'"),
    ("POST", "/v1/reports", b"{" + b" " * LIMIT + b"}", JSON, 413, "larger than the limit of 4,096 bytes"),
    ("POST", "/v1/reports", BOMB, {**JSON, "Content-Encoding": "gzip"}, 413, "gzip-decompressed request body"),
    ("DELETE", "/v1/reports", None, {}, 405, "method DELETE is not allowed on /v1/reports; use POST"),
    ("POST", "/v1/reports/abc", b"{}", JSON, 405, "method POST is not allowed on /v1/reports/abc; use GET, HEAD"),
    # behaviour
    ("POST", "/v1/behaviour", b"nope", JSON, 400, "body is not valid JSON"),
    ("POST", "/v1/behaviour", b'[{"event_id": "e", "user_id": "u", "ts_us": "now", "name": "tap"}]', JSON, 400,
     "events[0]: invalid behaviour event: field `ts_us`: expected `int`, got `str`"),
    ("POST", "/v1/behaviour", b'{"event_id": "e"}', JSON, 400,
     "invalid behaviour event: object missing required field `user_id`"),
    ("POST", "/v1/behaviour", b"[]", {"Content-Type": "application/xml"}, 415, "Content-Type must be application/json"),
    ("POST", "/v1/behaviour", b"[" + b" " * LIMIT + b"]", JSON, 413, "larger than the limit of 4,096 bytes"),
    ("PUT", "/v1/behaviour", b"[]", JSON, 405, "method PUT is not allowed on /v1/behaviour; use POST"),
    # elsewhere
    ("GET", "/v1/logs", None, {}, 404, "no endpoint at /v1/logs"),
    ("POST", "/", b"{}", JSON, 404, "no endpoint at /"),
    ("POST", "/healthz", b"", {}, 405, "method POST is not allowed on /healthz; use GET, HEAD"),
])
def test_bad_requests_get_a_status_and_a_message_naming_the_problem(gateway, method, path, body, headers, status,
                                                                    message):
    with gateway() as served:
        answer = call(method, served.url + path, body, headers)
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    assert message in answer.json()["error"], answer.json()
    assert served.sink.records == []


def test_a_chunked_body_without_a_length_is_cut_off_at_the_limit_too(gateway):
    chunks = (b" " * 1024 for _ in range(8))  # no Content-Length: urllib sends it chunked
    with gateway() as served:
        answer = call("POST", f"{served.url}/v1/behaviour", chunks, JSON)
    assert (answer.status, answer.json()) == (413, {"error": "request body is larger than the limit of 4,096 bytes"})


def test_our_own_errors_are_logged_with_an_id_and_answered_without_details(gateway, caplog):
    with gateway() as served:
        served.sink.failure = RuntimeError("disk on fire at /srv/secret-host")
        with caplog.at_level(logging.ERROR, logger="supportlens.gateway.app"):
            answer = post_json(f"{served.url}/v1/traces", otlp_request([otlp_span("req-1")], **CONSENTED_APP))
    assert answer.status == 500
    assert answer.json()["error"] == "internal error"
    assert b"secret-host" not in answer.body
    (logged,) = [r for r in caplog.records if answer.json()["id"] in r.getMessage()]
    assert "POST /v1/traces" in logged.getMessage() and logged.exc_info is not None


def test_when_kafka_does_not_take_the_records_the_client_is_told_to_retry(gateway):
    with gateway() as served:
        served.sink.failure = StorageUnavailable("Kafka did not store a record on t.fault-reports: timed out")
        answer = post_json(f"{served.url}/v1/reports", {"user_id": "u1"})
        served.sink.up = False
        health = call("GET", f"{served.url}/healthz")
    assert answer.status == 503 and answer.headers["Retry-After"] == "5"
    assert "timed out; retry later with the same ids" in answer.json()["error"]
    assert served.book.lookup("report-1") is None  # not stored, so not promised
    assert served.registry.get_sample_value("supportlens_gateway_unconfirmed_total",
                                            {"endpoint": "/v1/reports"}) == 1
    assert (health.status, health.json()) == (503, {"error": "Kafka does not answer"})
