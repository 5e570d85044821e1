"""The gateway's decisions without a server or a broker: addresses, consent, bodies, records, the report book."""

from __future__ import annotations

import gzip
import ipaddress
import zlib

import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from supportlens import contracts
from supportlens.config import Settings
from supportlens.contracts import DiagnosedReport, Diagnosis, FaultReport, Span
from supportlens.errors import UserError
from supportlens.gateway import otlp_wire
from supportlens.gateway.addresses import ClientAddressPolicy, anonymize_ip, parse_ip
from supportlens.gateway.ingest import (
    RequestRejected,
    accept_fault_report,
    accept_spans,
    consented,
    decode_behaviour,
    decompress_body,
    span_records,
)
from supportlens.gateway.receipts import ReportReceipts
from supportlens.gateway.status import ReportBook, diagnosis_view
from supportlens.otlp import RequestIdRule
from helpers import spans_in_records
from span_factory import client, server

RULE = RequestIdRule(("http.request_id",))
PROXIES = ClientAddressPolicy((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ff::/48")))


def _attrs(**values):
    return [{"key": k.replace("__", "."), "value": {"stringValue": v}} for k, v in values.items()]


def _otlp_span(request_id="req-1", **extra):
    return {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "name": "GET /pay",
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000250000000",
            "attributes": _attrs(http__request_id=request_id), **extra}


def _resource(spans, **attributes):
    return {"resource": {"attributes": _attrs(**attributes)}, "scopeSpans": [{"spans": spans}]}


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("203.0.113.7", "203.0.113.7"), ("203.0.113.7:5544", "203.0.113.7"), ("[2001:db8::1]:443", "2001:db8::1"),
    ("::ffff:198.51.100.2", "198.51.100.2"), (" 2001:db8::1 ", "2001:db8::1"),
    ("unknown", None), ("", None), (None, None),
])
def test_addresses_are_read_with_ports_brackets_and_ipv4_mapped_forms(text, expected):
    address = parse_ip(text)
    assert (str(address) if address else None) == expected


@pytest.mark.parametrize("ip, expected", [
    ("203.0.113.77", "203.0.113.0"), ("2001:db8:1:2:3::5", "2001:db8:1::"), ("::ffff:198.51.100.2", "198.51.100.0"),
    ("not-an-ip", ""),
])
def test_anonymizing_keeps_the_network_only_and_never_an_unreadable_value(ip, expected):
    assert anonymize_ip(ip) == expected


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("198.51.100.9", ["203.0.113.7"], "198.51.100.9"),  # untrusted peer: its header is ignored
    ("10.0.0.2", ["203.0.113.7"], "203.0.113.7"),  # trusted proxy: the client it saw
    ("10.0.0.2", ["1.1.1.1, 203.0.113.7, 10.0.0.3"], "203.0.113.7"),  # spoofed left part ignored, proxies skipped
    ("10.0.0.2", ["1.1.1.1", "203.0.113.7"], "203.0.113.7"),  # repeated headers read as one list
    ("10.0.0.2", ["10.0.0.5, 10.0.0.3"], "10.0.0.5"),  # only proxies: the farthest one
    ("10.0.0.2", ["203.0.113.7, garbage"], "10.0.0.2"),  # unreadable hop: believe nothing beyond it
    ("10.0.0.2", [], "10.0.0.2"),
    ("2001:db8:ff::1", ["[2001:db8:5::7]:1234"], "2001:db8:5::7"),
])
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(peer, forwarded, expected):
    assert PROXIES.client_ip(peer, forwarded) == expected


def test_the_resolved_address_is_anonymized_when_configured():
    policy = ClientAddressPolicy(PROXIES.trusted_proxies, anonymize=True)
    assert policy.client_ip("10.0.0.2", ["203.0.113.7"]) == "203.0.113.0"
    assert policy.client_ip("2001:db8:7:8::1") == "2001:db8:7::"


def test_a_trusted_proxy_that_is_not_a_network_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="'10.0.0.0/33' is not an IP network"):
        ClientAddressPolicy.from_settings(Settings(trusted_proxies=("10.0.0.0/8", "10.0.0.0/33")))


# --- bodies ------------------------------------------------------------------------------


def test_gzip_and_deflate_bodies_are_inflated():
    assert decompress_body(gzip.compress(b"hello"), "gzip", 1024) == b"hello"
    assert decompress_body(zlib.compress(b"hello"), "Deflate", 1024) == b"hello"
    assert decompress_body(b"plain", "", 1024) == b"plain"


@pytest.mark.parametrize("body, encoding, status, message", [
    (gzip.compress(b"\0" * 10_000_000), "gzip", 413,
     "gzip-decompressed request body is larger than the limit of 1,024 bytes"),
    (gzip.compress(b"x" * 1025), "gzip", 413, "larger than the limit"),
    (b"not gzip at all", "gzip", 400, "body is not valid gzip data"),
    (gzip.compress(b"hello")[:-6], "gzip", 400, "ends too early"),
    (gzip.compress(b"hello") + b"junk", "gzip", 400, "data after the end of its gzip stream"),
    (b"x", "br", 415, "Content-Encoding 'br' is not supported"),
])
def test_bodies_that_do_not_inflate_within_the_limit_are_refused(body, encoding, status, message):
    with pytest.raises(RequestRejected) as caught:
        decompress_body(body, encoding, 1024)
    assert caught.value.status == status
    assert message in caught.value.message


def test_protobuf_export_requests_become_otlp_json_with_hex_ids():
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", "checkout"
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.parent_span_id = bytes(range(16)), bytes(range(8)), bytes(range(8, 16))
    span.start_time_unix_nano, span.end_time_unix_nano, span.status.code = 1_000_000, 3_000_000, 2
    link = span.links.add()
    link.trace_id, link.span_id = b"\xff" * 16, b"\xee" * 8
    payload = otlp_wire.decode_export_request(request.SerializeToString(), otlp_wire.Encoding.PROTOBUF)
    out = payload["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert (out["traceId"], out["spanId"], out["parentSpanId"]) == (
        "000102030405060708090a0b0c0d0e0f", "0001020304050607", "08090a0b0c0d0e0f")
    assert out["links"][0] == {"traceId": "ff" * 16, "spanId": "ee" * 8}
    batch = accept_spans(payload, RequestIdRule(()), "203.0.113.7", ClientAddressPolicy())
    assert batch.withheld == 1  # a client app without the consent attribute
    request.resource_spans[0].resource.attributes.add(key="supportlens.consent").value.string_value = "granted"
    payload = otlp_wire.decode_export_request(request.SerializeToString(), otlp_wire.Encoding.PROTOBUF)
    (stored,) = accept_spans(payload, RequestIdRule(()), "203.0.113.7", ClientAddressPolicy()).spans
    assert (stored.request_id, stored.status, stored.duration_us) == ("000102030405060708090a0b0c0d0e0f", "error", 2000)


@pytest.mark.parametrize("body, encoding, status, message", [
    (b"\xff\xff\xff\xff", otlp_wire.Encoding.PROTOBUF, 400, "not a protobuf ExportTraceServiceRequest"),
    (b"{not json", otlp_wire.Encoding.JSON, 400, "body is not valid JSON"),
    (b"[1, 2]", otlp_wire.Encoding.JSON, 400, "must be a JSON object, got an array"),
])
def test_export_requests_that_do_not_decode_are_400(body, encoding, status, message):
    with pytest.raises(RequestRejected) as caught:
        otlp_wire.decode_export_request(body, encoding)
    assert (caught.value.status, message in caught.value.message) == (status, True)


def test_only_the_two_otlp_content_types_are_taken():
    assert otlp_wire.encoding_of("application/x-protobuf") is otlp_wire.Encoding.PROTOBUF
    with pytest.raises(RequestRejected, match="Content-Type must be application/x-protobuf or application/json"):
        otlp_wire.encoding_of("text/plain")


def test_export_responses_are_empty_on_success_and_partial_otherwise():
    assert otlp_wire.export_response(otlp_wire.Encoding.JSON, 0, "") == b"{}"
    assert msgspec.json.decode(otlp_wire.export_response(otlp_wire.Encoding.JSON, 2, "why")) == {
        "partialSuccess": {"rejectedSpans": 2, "errorMessage": "why"}}
    response = ExportTraceServiceResponse.FromString(otlp_wire.export_response(otlp_wire.Encoding.PROTOBUF, 3, "why"))
    assert (response.partial_success.rejected_spans, response.partial_success.error_message) == (3, "why")
    assert otlp_wire.export_response(otlp_wire.Encoding.PROTOBUF, 0, "") == b""


# --- spans -------------------------------------------------------------------------------


def test_consent_decides_per_resource_and_server_resources_need_none():
    payload = {"resourceSpans": [
        _resource([_otlp_span("a"), _otlp_span("b")], service__name="app"),  # no consent
        _resource([_otlp_span("c")], service__name="app", supportlens__consent="denied"),
        _resource([_otlp_span("d")], service__name="app", supportlens__consent="granted"),
        _resource([_otlp_span("e")], service__name="payment", supportlens__side="server"),
    ]}
    batch = accept_spans(payload, RULE, "203.0.113.7", ClientAddressPolicy())
    assert [(s.request_id, s.side, s.client_ip) for s in batch.spans] == [
        ("d", "client", "203.0.113.7"), ("e", "server", "")]
    assert (batch.withheld, batch.rejected, batch.refused) == (3, 0, 3)
    assert 'supportlens.consent is not "granted"' in batch.message()
    records = span_records(batch.spans, 6, 1_048_576)
    assert [(r.topic, r.key) for r in records] == [("client-spans", "d"), ("server-spans", "e")]
    assert spans_in_records(records[:1], 6)[0].attributes["supportlens.consent"] == "granted"


def test_an_export_goes_as_one_record_per_topic_and_destination_partition():
    spans = [client(request_id=f"req-{i}") if i % 3 else server("payment", f"s{i}", "", 0, 5, request_id=f"req-{i}")
             for i in range(200)]
    records = span_records(spans, 6, 1_048_576)
    for topic, side in (("client-spans", "client"), ("server-spans", "server")):
        mine = [r for r in records if r.topic == topic]
        # one record per destination partition, each on the partition murmur2 gives its request ids
        assert sorted(r.partition for r in mine) == list(range(6))
        assert sorted(s.request_id for s in spans_in_records(mine, 6)) == sorted(
            s.request_id for s in spans if s.side == side)
    # a record never passes the readers' limit: a small limit splits a partition's spans
    small = span_records(spans, 6, 2048)
    assert all(len(r.value) <= 2048 for r in small) and len(small) > len(records)
    assert sorted(s.request_id for s in spans_in_records(small, 6)) == sorted(s.request_id for s in spans)


def test_rejected_spans_keep_their_paths_when_resources_before_them_are_withheld():
    bad = _otlp_span("x")
    del bad["startTimeUnixNano"]
    payload = {"resourceSpans": [
        _resource([_otlp_span("a")], service__name="app"),
        _resource([_otlp_span("b"), bad], service__name="app", supportlens__consent="granted"),
        {"resource": "not an object", "scopeSpans": [{"spans": [_otlp_span("y")]}]},
        "junk",
        {"resource": {"attributes": [{"key": "n", "value": {"intValue": "abc"}}]}, "scopeSpans": [{"spans": [{}, {}]}]},
    ]}
    batch = accept_spans(payload, RULE, "203.0.113.7", ClientAddressPolicy(anonymize=True))
    assert [(s.request_id, s.client_ip) for s in batch.spans] == [("b", "203.0.113.0")]
    assert batch.reasons == [
        "resourceSpans[2]: `resource` is not an object",
        "resourceSpans[4]: `resource.attributes`: `intValue` is not an integer: 'abc'",
        "resourceSpans[1].scopeSpans[0].spans[1]: missing `startTimeUnixNano`",
        "resourceSpans[3]: not an object",
    ]
    assert (batch.rejected, batch.withheld) == (5, 1)


def test_a_request_without_spans_is_accepted_and_one_that_is_not_otlp_is_400():
    assert accept_spans({}, RULE, "", ClientAddressPolicy()).refused == 0
    with pytest.raises(RequestRejected, match="`resourceSpans` must be a list, got a string"):
        accept_spans({"resourceSpans": "x"}, RULE, "", ClientAddressPolicy())


def test_a_misshapen_span_is_rejected_alone_with_its_path():
    shapeless = {"resourceSpans": [_resource([_otlp_span(status="broken"), _otlp_span("2")], supportlens__consent="granted")]}
    batch = accept_spans(shapeless, RULE, "", ClientAddressPolicy())
    assert (batch.rejected, len(batch.spans)) == (1, 1)
    assert batch.reasons == ["resourceSpans[0].scopeSpans[0].spans[0]: a field that must be an object or list is not"]


def test_the_partial_success_message_shows_the_first_reasons_and_counts_the_rest():
    spans = [dict(_otlp_span(str(i)), startTimeUnixNano="soon") for i in range(5)]
    payload = {"resourceSpans": [_resource(spans, supportlens__consent="granted")]}
    batch = accept_spans(payload, RULE, "", ClientAddressPolicy())
    assert batch.rejected == 5
    assert batch.message().count("is not an integer") == 3
    assert batch.message().endswith("; and 2 more")


# --- fault reports -----------------------------------------------------------------------


def _report_body(**fields):
    report = {"user_id": "u1", "locale": "zh-CN", "request_ids": ["req-9"], "error_code": "PAY_TIMEOUT",
              "client_log": [{"request_id": "req-9", "side": "server", "service": "app", "start_us": 1,
                              "duration_us": 5, "status": "error", "client_ip": "198.51.100.23"}], **fields}
    return msgspec.json.encode({k: v for k, v in report.items() if v is not None})


def _accept(body, policy=None):
    return accept_fault_report(body, received_at_us=1_700_000_000_000_000, client_ip="203.0.113.7",
                               new_report_id=lambda: "new-id", policy=policy or ClientAddressPolicy(),
                               max_bytes=1_048_576)


def test_the_gateway_sets_time_and_address_and_attaches_the_client_log():
    accepted = _accept(_report_body(received_at_us=5, client_ip="1.2.3.4"), ClientAddressPolicy(anonymize=True))
    report = accepted.report
    assert (report.report_id, report.client_ip) == ("new-id", "203.0.113.7")
    assert report.received_at_us == 1_700_000_000_000_000
    (span,) = accepted.attached_spans
    assert (span.side, span.client_ip, span.attributes["attached_to_report"]) == ("client", "198.51.100.0", "new-id")
    assert report.client_log[0].client_ip == "198.51.100.0"  # no full address stays in the report either
    records = accepted.records(6, 1_048_576)
    assert [(r.topic, r.key) for r in records] == [("fault-reports", "new-id"), ("client-spans", "req-9")]
    assert contracts.decode(records[0].value, FaultReport) == report


def test_a_client_chosen_report_id_is_kept_so_a_retry_is_the_same_report():
    assert _accept(_report_body(report_id="mine-1")).report.report_id == "mine-1"


def test_a_retried_report_keeps_the_time_and_address_of_its_first_attempt_so_it_is_the_same_row():
    # Kafka may store an attempt the gateway answered 503 (a broker that stalled past the delivery
    # timeout); the retry must then be the same row: fault_reports is keyed by (client_ip, received_at, id)
    receipts = ReportReceipts(capacity=2)

    def attempt(report_id, at_us, ip, body=None):
        return accept_fault_report(body or _report_body(report_id=report_id), received_at_us=at_us, client_ip=ip,
                                   new_report_id=lambda: "new-id", policy=ClientAddressPolicy(), max_bytes=1_048_576,
                                   first_receipt=receipts.first).report

    first = attempt("mine-1", 100, "203.0.113.7")
    retry = attempt("mine-1", 900, "198.51.100.4")  # later, and from the user's other network
    assert (retry.received_at_us, retry.client_ip) == (first.received_at_us, first.client_ip) == (100, "203.0.113.7")
    assert contracts.encode(retry) == contracts.encode(first)
    unnamed = attempt("", 950, "203.0.113.7", _report_body())  # the gateway's own ids are never retried
    assert (unnamed.report_id, unnamed.received_at_us) == ("new-id", 950)
    attempt("mine-2", 1000, "203.0.113.7")
    attempt("mine-3", 1100, "203.0.113.7")  # over capacity: the oldest id is forgotten
    assert attempt("mine-1", 1200, "203.0.113.7").received_at_us == 1200


@pytest.mark.parametrize("body, message", [
    (b"{oops", "body is not valid JSON"),
    (b'"a string"', "a fault report must be a JSON object, got a string"),
    (_report_body(locale="fr"), "invalid fault report: field `locale`"),
    (_report_body(request_ids="req-9"), "invalid fault report: field `request_ids`: expected `array`, got `str`"),
    (_report_body(client_log=[{"side": "client"}]),
     "field `client_log[0]`: object missing required field `request_id`"),
    (_report_body(report_id=7), "field `report_id`: expected `str`, got `int`"),
])
def test_invalid_reports_are_400_naming_the_field(body, message):
    with pytest.raises(RequestRejected) as caught:
        _accept(body)
    assert caught.value.status == 400
    assert message in caught.value.message


def test_an_attached_span_already_at_the_attribute_limit_is_refused_naming_it():
    full = {"request_id": "r", "side": "client", "service": "app", "start_us": 1, "duration_us": 1, "status": "ok",
            "attributes": {f"a{i}": i for i in range(128)}}
    with pytest.raises(RequestRejected, match=r"client_log\[0\]: invalid span: field `attributes`"):
        _accept(_report_body(client_log=[full]))


# --- behaviour ---------------------------------------------------------------------------


def _event(**fields):
    return {"event_id": "e1", "user_id": "u1", "ts_us": 1, "name": "tap", **fields}


def test_behaviour_is_one_event_or_an_array_of_them():
    assert [e.event_id for e in decode_behaviour(msgspec.json.encode(_event()), 1024)] == ["e1"]
    body = msgspec.json.encode([_event(), _event(event_id="e2")])
    assert [e.event_id for e in decode_behaviour(body, 1024)] == ["e1", "e2"]
    assert consented(" Granted") and not consented(None) and not consented("yes")


@pytest.mark.parametrize("body, message", [
    (msgspec.json.encode([_event(), _event(ts_us="now")]),
     "events[1]: invalid behaviour event: field `ts_us`: expected `int`, got `str`"),
    (msgspec.json.encode([_event(), 3]), "events[1]: invalid behaviour event: expected a JSON object"),
    (msgspec.json.encode({"user_id": "u"}), "invalid behaviour event: object missing required field `event_id`"),
    (b"42", "behaviour must be an event object or an array of them, got a number"),
])
def test_invalid_behaviour_is_400_naming_the_event_and_field(body, message):
    with pytest.raises(RequestRejected) as caught:
        decode_behaviour(body, 1024)
    assert message in caught.value.message


# --- the report book ---------------------------------------------------------------------


def _diagnosed(report_id, at_us=2, **fields):
    return DiagnosedReport(report_id=report_id, received_at_us=1, diagnosed_at_us=at_us,
                           diagnosis=Diagnosis(cls="server_error", service="payment"), title=f"t{at_us}", **fields)


def test_the_book_answers_diagnosed_pending_or_unknown():
    book = ReportBook()
    book.accepted("r1")
    assert book.lookup("r1") == "pending" and book.lookup("r2") is None
    book.add_diagnoses([_diagnosed("r1", 5), _diagnosed("r1", 3), _diagnosed("r2", 9, drill=True)])
    found = book.lookup("r1")
    assert found.title == "t5"  # the latest diagnosis wins; a drill answers nobody
    assert book.lookup("r2") is None
    assert diagnosis_view(found) == {"report_id": "r1", "status": "diagnosed", "diagnosis": "server_error",
                                     "title": "t5", "explanation": "", "action": "", "doc_url": "", "locale": "en"}


def test_the_book_forgets_the_least_recently_used_beyond_its_capacity():
    book = ReportBook(capacity=2)
    for report_id in ("a", "b"):
        book.accepted(report_id)
    book.lookup("a")
    book.accepted("c")
    assert [book.lookup(r) for r in ("a", "b", "c")] == ["pending", None, "pending"]


# --- found by fuzzing (tests/test_fuzz_decoders.py, tests/test_fuzz_gateway.py) ----------------


@pytest.mark.parametrize("body, message", [
    (b'{"\x80": 1}', "body is not valid JSON (it holds bytes that are not UTF-8 text)"),  # was a 500
    (b"[" * 100_000 + b"]" * 100_000, "body is nested too deeply (arrays and objects inside each other)"),
])
def test_json_bodies_the_decoder_cannot_read_are_400_not_500(body, message):
    for decode_body in (lambda b: decode_behaviour(b, 1_048_576),
                        lambda b: otlp_wire.decode_export_request(b, otlp_wire.Encoding.JSON)):
        with pytest.raises(RequestRejected) as caught:
            decode_body(body)
        assert (caught.value.status, caught.value.message) == (400, message)


def _quoted_attribute_span(size: int) -> dict:
    # a nested attribute value becomes JSON text in the stored span: every quote in it grows
    quotes = {"key": "quotes", "value": {"arrayValue": {"values": [{"stringValue": '"' * size}]}}}
    return _otlp_span(attributes=[*_attrs(http__request_id="req-1"), quotes])


def test_a_span_larger_once_normalized_than_the_limit_is_rejected_not_stored():
    payload = {"resourceSpans": [_resource([_otlp_span("req-0"), _quoted_attribute_span(2000)],
                                           supportlens__side="server")]}
    assert len(msgspec.json.encode(payload)) < 8192
    batch = accept_spans(payload, RULE, "", ClientAddressPolicy(), max_bytes=8192)
    assert [s.request_id for s in batch.spans] == ["req-0"]
    (reason,) = batch.reasons
    assert reason.startswith("span of request 'req-1' is ") and reason.endswith("over the limit of 8,192 bytes")


def test_a_report_larger_as_stored_than_the_limit_is_413():
    body = msgspec.json.encode({"user_id": "u1", "screen": ['"' * 2000]})  # unknown: kept as JSON text
    assert len(body) < 4096
    with pytest.raises(RequestRejected) as caught:
        accept_fault_report(body, received_at_us=1, client_ip="203.0.113.7", new_report_id=lambda: "r1",
                            policy=ClientAddressPolicy(), max_bytes=4096)
    assert (caught.value.status, caught.value.message) == (
        413, "fault report as stored is larger than the limit of 4,096 bytes")


def test_a_resource_attribute_of_the_wrong_shape_is_named_in_words_not_pythons():
    kvlist = {"key": "ctx", "value": {"kvlistValue": {"values": ["not a key-value"]}}}
    resource = {"resource": {"attributes": [kvlist]}, "scopeSpans": [{"spans": [_otlp_span()]}]}
    batch = accept_spans({"resourceSpans": [resource]}, RULE, "", ClientAddressPolicy())
    assert batch.reasons == [  # was: "'str' object has no attribute 'get'"
        "resourceSpans[0]: `resource.attributes`: a field that must be an object or list is not"]
