"""Fuzzing every gateway endpoint over HTTP (issue #8): never a 5xx, every 4xx says why in JSON,
every 2xx stored only records the strict contracts accept.

The gateway is built as ``supportlens gateway`` serves it (default settings: no API keys,
bodies left compressed for the gateway to inflate), storing into memory, and asked
through aiohttp's test client with structure-aware mutations of valid requests, random
bytes, every content type and encoding, and wrong methods and paths. Requests are always
well-formed HTTP: a request line aiohttp's parser refuses never reaches the application.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import string
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import event, given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from yarl import URL

import fuzz_strategies as fs
from fuzzing import assert_readable, case, fuzz_settings
from helpers import spans_in_records
from supportlens import contracts
from supportlens.config import load_settings
from supportlens.contracts import BehaviourEvent, Change, DiagnosedReport, FaultReport, Span
from supportlens.gateway.app import build_app
from supportlens.gateway.ingest import OutRecord
from supportlens.gateway.status import ReportBook
from test_gateway_http import MemorySink

LIMIT = 4096  # max_record_bytes: small, so generated bodies cross it
PARTITIONS = 6  # the settings' default, which the gateway below keeps
TOPIC_TYPES: dict[str, type] = {"client-spans": Span, "server-spans": Span, "fault-reports": FaultReport,
                                "behaviour": BehaviourEvent, "changes": Change}
DIAGNOSED = fs.RECORDS[DiagnosedReport]
PENDING_ID = "pending-report"
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
PATHS = ["/v1/traces", "/v1/reports", "/v1/reports/", f"/v1/reports/{PENDING_ID}", "/v1/behaviour", "/healthz",
         "/metrics", "/", "/v1", "/v1/traces/", "/V1/TRACES", "/v1/reports/x/y", "/v1//traces", "/v1/traces?x=1",
         "/v1/reports/%2e%2e", "/..", "/v1/reports/%ZZ", "/v1/behaviour;a=b", "/v1/changes"]
PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?"
CONTENT_TYPES = ["application/json", "application/x-protobuf", "application/json; charset=utf-8",
                 "APPLICATION/JSON", "application/protobuf", "text/plain", "multipart/form-data; boundary=x",
                 "application/json; charset=\"", "application/x-www-form-urlencoded", ";", "/", "application/"]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


@dataclass(repr=False)  # hypothesis shows the fixture with a failing case: keep it short
class FuzzedGateway:
    loop: asyncio.AbstractEventLoop
    client: TestClient
    sink: MemorySink

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             chunked: bool = False) -> tuple[Answer, list[OutRecord]]:
        """One request; the answer and the records it stored."""
        if len(self.sink.records) > 1000:
            self.sink.records.clear()
        before = len(self.sink.records)
        headers = dict(headers or {})
        data: Any = body
        if chunked and body is not None:
            data = _chunks(body)  # no Content-Length: the limit must hold while reading
        url = URL(str(self.client.make_url("/")).rstrip("/") + path, encoded=True)

        async def go() -> Answer:
            async with self.client.session.request(
                method, url, data=data, headers=headers, skip_auto_headers=() if "Content-Type" in headers
                else ("Content-Type",), allow_redirects=False,
            ) as response:
                return Answer(response.status, response.headers.get("Content-Type", ""), await response.read())

        answer = self.loop.run_until_complete(asyncio.wait_for(go(), 10))
        return answer, self.sink.records[before:]


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start:start + 1000]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedGateway]:
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
            patch.delenv(key)
        settings = load_settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="t.", max_record_bytes=LIMIT,
                                 state_dir=tmp_path_factory.mktemp("gateway"))
    sink, book = MemorySink(), ReportBook()
    book.accepted(PENDING_ID)
    book.add_diagnoses([DIAGNOSED])
    ids = (f"report-{n}" for n in itertools.count(1))

    async def start() -> TestClient:
        app = build_app(settings, sink, book, clock_us=lambda: fs.T0, new_report_id=lambda: next(ids))
        server = TestServer(app)
        # as open_site serves it: bodies reach the handlers compressed, the gateway inflates them
        await server.start_server(auto_decompress=False, access_log=None)
        client = TestClient(server)
        await client.start_server()
        return client

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(start())
    try:
        yield FuzzedGateway(loop, client, sink)
    finally:
        loop.run_until_complete(client.close())
        loop.close()


# --- the properties ------------------------------------------------------------------------


def check(method: str, answer: Answer, stored: list[OutRecord]) -> Any:
    """Never a 5xx; a 4xx is ``{"error": "<why>"}`` and stored nothing; a 2xx stored only valid records.

    Returns the answer's JSON body (None for a HEAD request or a protobuf answer).
    """
    event(f"HTTP {answer.status}{', stored records' if stored else ''}")  # --hypothesis-show-statistics
    assert answer.status < 500, (answer.status, answer.body[:500])
    assert b"Traceback" not in answer.body
    for record in stored:
        assert 200 <= answer.status < 300, (answer.status, record)
        record_type = TOPIC_TYPES[record.topic]
        if record_type is Span:  # a batch record: within the readers' limit, every span on its side's topic
            assert len(record.value) <= LIMIT
            assert all(record.topic == f"{span.side}-spans" for span in spans_in_records([record], PARTITIONS))
            continue
        decoded = contracts.decode(record.value, record_type, LIMIT)
        assert contracts.encode(decoded) == record.value
        assert record.key == (decoded.user_id if record_type is BehaviourEvent else
                              decoded.report_id if record_type is FaultReport else
                              decoded.change_id if record_type is Change else decoded.request_id)
    if method == "HEAD" or not answer.content_type.startswith("application/json"):
        assert answer.status < 400 or method == "HEAD", (answer.status, answer.content_type, answer.body[:300])
        return None
    body = msgspec.json.decode(answer.body)
    if answer.status >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body
        assert_readable(body["error"])
    return body


@st.composite
def encoded(draw: st.DrawFn, body: bytes) -> tuple[bytes, dict[str, str]]:
    """``body`` as a client may send it: plain, compressed, compressed and broken, or mislabelled."""
    how = draw(st.sampled_from(["plain", "plain", "plain", "gzip", "deflate", "broken", "mislabelled", "unknown"]))
    if how == "plain":
        return body, {}
    if how in ("gzip", "deflate"):
        return fs.compress(body, how, draw(st.integers(1, 9))), {"Content-Encoding": how}
    if how == "broken":
        encoding = draw(st.sampled_from(["gzip", "deflate"]))
        return draw(fs.garbled(fs.compress(body, encoding))), {"Content-Encoding": encoding}
    if how == "mislabelled":
        return body, {"Content-Encoding": draw(st.sampled_from(["gzip", "deflate", "x-gzip"]))}
    return body, {"Content-Encoding": draw(st.one_of(st.sampled_from(fs.ENCODINGS), header_text))}


def requests_with(bodies: st.SearchStrategy[bytes], content_types: list[str]) -> st.SearchStrategy[Any]:
    """(body, headers, chunked) for a POST: a body in some encoding, a content type, sometimes no length."""
    return st.tuples(
        bodies.flatmap(encoded),
        # mostly (7 in 10) the endpoint's own types, so bodies get past the 415 to the decoders
        st.tuples(st.integers(0, 9), st.sampled_from(content_types), st.sampled_from([*CONTENT_TYPES, None]))
        .map(lambda choice: choice[1] if choice[0] < 7 else choice[2]),
        st.integers(0, 9).map(lambda n: n == 0),
    ).map(lambda t: (t[0][0], {**t[0][1], **({"Content-Type": t[1]} if t[1] is not None else {})}, t[2]))


def bomb(size: int) -> bytes:
    return fs.compress(b"{" + b" " * size, "gzip", 9)


# --- POST /v1/traces -----------------------------------------------------------------------


@fuzz_settings(500)
@given(request=requests_with(st.one_of(fs.json_bytes_for(fs.OTLP_REQUEST), st.just(bomb(10 * LIMIT))),
                             ["application/json", "application/json; charset=utf-8"]))
def test_post_traces_json(gateway, request):
    case("POST /v1/traces (JSON)")
    body, headers, chunked = request
    answer, stored = gateway.send("POST", "/v1/traces", body, headers, chunked)
    reply = check("POST", answer, stored)
    if answer.status == 200 and reply is not None:
        assert set(reply) <= {"partialSuccess"}
        if "partialSuccess" in reply:
            assert reply["partialSuccess"]["rejectedSpans"] >= 1
            assert_readable(reply["partialSuccess"]["errorMessage"])


@fuzz_settings(300)
@given(request=requests_with(fs.proto_bodies(), ["application/x-protobuf"]))
def test_post_traces_protobuf(gateway, request):
    case("POST /v1/traces (protobuf)")
    body, headers, chunked = request
    answer, stored = gateway.send("POST", "/v1/traces", body, headers, chunked)
    check("POST", answer, stored)
    if answer.status == 200 and answer.content_type == "application/x-protobuf":
        reply = ExportTraceServiceResponse.FromString(answer.body)
        if reply.partial_success.rejected_spans:
            assert_readable(reply.partial_success.error_message)


# --- fault reports and their status -----------------------------------------------------------

REPORT_BODY = {k: v for k, v in fs.plain(fs.RECORDS[FaultReport]).items() if k not in ("received_at_us", "client_ip")}


@fuzz_settings(400)
@given(request=requests_with(fs.json_bytes_for(REPORT_BODY), ["application/json"]))
def test_post_reports(gateway, request):
    case("POST /v1/reports")
    body, headers, chunked = request
    answer, stored = gateway.send("POST", "/v1/reports", body, headers, chunked)
    reply = check("POST", answer, stored)
    if answer.status == 202:
        report = contracts.decode(stored[0].value, FaultReport)
        assert stored[0].topic == "fault-reports" and reply["report_id"] == report.report_id
        status_path = URL(reply["status_url"]).raw_path
        status, _ = gateway.send("GET", status_path)
        assert status.status in (200, 202), (status_path, status)  # 200 when the id is the diagnosed one's
        check("GET", status, [])


report_ids = st.one_of(
    st.sampled_from([PENDING_ID, DIAGNOSED.report_id, "report-1", "", "%", "..", "x" * 300]),
    st.text(max_size=40),
    fs.huge_strings.map(lambda s: s[:500]),  # quoted, under aiohttp's 8 kB request line
)


@fuzz_settings(300)
@given(report_id=report_ids, method=st.sampled_from(["GET", "GET", "HEAD"]), headers=st.dictionaries(
    st.sampled_from(["Accept", "Content-Type", "X-Forwarded-For", "If-None-Match"]), header_text, max_size=3))
def test_get_report_status(gateway, report_id, method, headers):
    case("GET /v1/reports/{id}")
    answer, stored = gateway.send(method, "/v1/reports/" + urllib.parse.quote(report_id, safe=""), None, headers)
    reply = check(method, answer, stored)
    expected = {PENDING_ID: 202, DIAGNOSED.report_id: 200}.get(report_id)
    if report_id and expected is not None:
        assert answer.status == expected
    if reply is not None and answer.status == 200:
        assert (reply["status"], reply["report_id"]) == ("diagnosed", report_id)


# --- POST /v1/behaviour ----------------------------------------------------------------------

EVENT = fs.plain(fs.RECORDS[BehaviourEvent])
ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)
# Events the contract accepts, with generated values: the path that stores must hold too.
valid_events = st.builds(
    BehaviourEvent, event_id=ids, user_id=ids, ts_us=st.integers(0, 32_503_680_000_000_000),
    name=st.text(min_size=1, max_size=128), screen=st.text(max_size=40),
    attributes=st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=20), st.integers(), st.booleans(),
                                                               st.floats(allow_nan=False, allow_infinity=False))),
).map(fs.plain)


behaviour_bodies = st.sampled_from([  # a third from each family (one_of would weigh by branch count)
    fs.json_bytes_for(EVENT),
    fs.json_bytes_for([EVENT, EVENT]),
    st.lists(valid_events, min_size=1, max_size=3).map(fs.to_json),
]).flatmap(lambda family: family)


@fuzz_settings(400)
@given(request=requests_with(behaviour_bodies, ["application/json"]),
       consent=st.one_of(st.just("granted"), st.just("granted"), st.none(),
                         st.sampled_from([" GRANTED ", "denied", ""]), header_text))
def test_post_behaviour(gateway, request, consent):
    case("POST /v1/behaviour")
    body, headers, chunked = request
    if consent is not None:
        headers["X-Supportlens-Consent"] = consent
    answer, stored = gateway.send("POST", "/v1/behaviour", body, headers, chunked)
    reply = check("POST", answer, stored)
    if answer.status == 202:
        assert reply["accepted"] == len(stored) and (reply["accepted"] == 0 or reply["dropped_without_consent"] == 0)
        assert all(record.topic == "behaviour" for record in stored)


# --- POST /v1/changes ------------------------------------------------------------------------

CHANGE = fs.plain(fs.RECORDS[Change])
change_bodies = st.sampled_from([fs.json_bytes_for(CHANGE), fs.json_bytes_for([CHANGE, CHANGE])]).flatmap(
    lambda family: family)


@fuzz_settings(300)
@given(request=requests_with(change_bodies, ["application/json"]))
def test_post_changes(gateway, request):
    case("POST /v1/changes")
    body, headers, chunked = request
    answer, stored = gateway.send("POST", "/v1/changes", body, headers, chunked)
    reply = check("POST", answer, stored)
    if answer.status == 202:
        assert reply["accepted"] == len(stored) == len(reply["change_ids"]) > 0
        assert [record.key for record in stored] == reply["change_ids"]
        assert all(record.topic == "changes" for record in stored)


# --- GET /healthz, and everything else ---------------------------------------------------------


@fuzz_settings(100)
@given(method=st.sampled_from(METHODS), headers=st.dictionaries(
    st.sampled_from(["Accept", "Authorization", "X-Api-Key", "Cookie", "X-Forwarded-For", "Content-Type"]),
    header_text, max_size=3))
def test_healthz(gateway, method, headers):
    case("GET /healthz")
    answer, stored = gateway.send(method, "/healthz", None, headers)
    reply = check(method, answer, stored)
    if method in ("GET", "HEAD"):
        assert answer.status == 200
        assert reply in (None, {"status": "ok"})
    else:
        assert answer.status == 405


paths = st.one_of(
    st.sampled_from(PATHS),
    st.text(PATH_CHARS, max_size=60).map(lambda p: "/" + p.lstrip("/")),
    st.text(max_size=20).map(lambda t: "/v1/reports/" + urllib.parse.quote(t, safe="")),
)


@fuzz_settings(400)
@given(method=st.sampled_from(METHODS), path=paths,
       request=requests_with(st.one_of(st.binary(max_size=256), fs.json_bytes_for(EVENT),
                                       fs.json_bytes_for(fs.OTLP_REQUEST), st.binary(min_size=LIMIT + 1,
                                                                                     max_size=LIMIT + 64)),
                             CONTENT_TYPES),
       with_body=st.booleans())
def test_any_method_path_type_and_encoding(gateway, method, path, request, with_body):
    case("any method, path, content type and encoding")
    body, headers, chunked = request
    answer, stored = gateway.send(method, path, body if with_body else None, headers, chunked and with_body)
    check(method, answer, stored)
