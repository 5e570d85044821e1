"""OTLP/JSON normalization: resource/scope/span → normalized spans, with per-span rejection."""

from __future__ import annotations

import pytest

from supportlens.contracts import Span, decode, encode
from supportlens.otlp import RequestIdRule, normalize_request

RULE = RequestIdRule(attributes=("http.request_id", "x-request-id"))


def _attr(key, value):
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}  # OTLP/JSON writes int64 as a string
    return {"key": key, "value": {"stringValue": value}}


def _payload(*spans, resource=None):
    resource = resource or {"service.name": "payment", "service.version": "2.4.1", "cloud.region": "eu-west"}
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [_attr(k, v) for k, v in resource.items()]},
                "scopeSpans": [{"scope": {"name": "io.opentelemetry.aiohttp"}, "spans": list(spans)}],
            }
        ]
    }


def _span(**overrides):
    span = {
        "traceId": "4BF92F3577B34DA6A3CE929D0E0E4736",
        "spanId": "00f067aa0ba902b7",
        "parentSpanId": "a2fb4a1d1a96d312",
        "name": "POST /v1/payments/confirm",
        "kind": 2,
        "startTimeUnixNano": "1763784000000000000",
        "endTimeUnixNano": "1763784000250000000",
        "attributes": [
            _attr("http.request_id", "req-42"),
            _attr("http.response.status_code", 503),
            _attr("error.type", "PAYMENT_BACKEND_UNAVAILABLE"),
            _attr("enduser.id", "user-7"),
            _attr("db.system", "postgresql"),
        ],
        "status": {"code": 2, "message": "upstream connection refused"},
    }
    span.update(overrides)
    return span


def test_a_server_span_is_normalized_with_its_resource():
    result = normalize_request(_payload(_span()), RULE, side="server")
    assert result.rejected == []
    (span,) = result.spans
    assert span.request_id == "req-42"
    assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"  # hex ids are case-normalized
    assert span.side == "server"
    assert span.service == "payment"
    assert span.app_version == "2.4.1"
    assert span.region == "eu-west"
    assert span.start_us == 1_763_784_000_000_000
    assert span.duration_us == 250_000
    assert span.status == "error"
    assert span.http_status == 503
    assert span.error_code == "PAYMENT_BACKEND_UNAVAILABLE"
    assert span.error_message == "upstream connection refused"
    assert span.user_id == "user-7"
    # consumed keys are not repeated, but a backend's own version is kept for the canary comparison
    assert span.attributes == {"db.system": "postgresql", "service.version": "2.4.1"}
    assert span.client_ip == ""  # server spans never carry the end user's address


def test_request_id_falls_back_to_the_trace_id_and_can_be_forbidden_to():
    span = _span(attributes=[])
    assert normalize_request(_payload(span), RULE, side="server").spans[0].request_id == (
        "4bf92f3577b34da6a3ce929d0e0e4736"
    )
    strict = RequestIdRule(attributes=RULE.attributes, from_trace_id=False)
    result = normalize_request(_payload(span), strict, side="server")
    assert result.spans == []
    assert result.rejected == [
        "resourceSpans[0].scopeSpans[0].spans[0]: no request id: none of the attributes "
        "http.request_id, x-request-id is set and taking it from the trace id is switched off"
    ]


def test_a_client_span_takes_network_and_the_address_the_gateway_saw():
    resource = {"service.name": "mobile-app", "os.type": "android", "network.carrier.name": "Orange",
                "network.connection.type": "cell"}
    span = _span(attributes=[_attr("x-request-id", "req-9"), _attr("http.response.status_code", 200)], status={})
    (out,) = normalize_request(_payload(span, resource=resource), RULE, side="client", client_ip="203.0.113.9").spans
    assert (out.side, out.status, out.client_ip, out.platform) == ("client", "ok", "203.0.113.9", "android")
    assert out.network is not None and (out.network.isp, out.network.connection_type) == ("Orange", "cell")


def test_bad_spans_are_rejected_one_by_one_and_good_neighbours_kept():
    good = _span()
    no_start = _span()
    del no_start["startTimeUnixNano"]
    backwards = _span(endTimeUnixNano="1")
    bad_trace = _span(traceId="xyz")
    result = normalize_request(_payload(good, no_start, backwards, bad_trace, "oops"), RULE, side="server")
    assert len(result.spans) == 1
    prefix = "resourceSpans[0].scopeSpans[0].spans"
    assert result.rejected == [
        f"{prefix}[1]: missing `startTimeUnixNano`",
        f"{prefix}[2]: `endTimeUnixNano` is before `startTimeUnixNano`",
        f"{prefix}[3]: `traceId` is not 32 hex digits: 'xyz'",
        f"{prefix}[4]: not an object",
    ]


def test_a_payload_without_resource_spans_is_rejected_as_a_whole():
    assert normalize_request({"spans": []}, RULE, side="server").rejected == ["resourceSpans: missing or not a list"]


def test_wrongly_shaped_json_is_rejected_with_its_path_never_raised():
    payload = {"resourceSpans": [
        {"resource": "oops", "scopeSpans": []},
        {"resource": {"attributes": []}, "scopeSpans": "nope"},
        {"resource": {"attributes": []}, "scopeSpans": [{"spans": "x"}]},
        _payload(_span(status="broken"))["resourceSpans"][0],
        _payload(_span())["resourceSpans"][0],
    ]}
    result = normalize_request(payload, RULE, side="server")
    assert len(result.spans) == 1
    assert [r.split(":")[0] for r in result.rejected] == [
        "resourceSpans[0]", "resourceSpans[1]", "resourceSpans[2].scopeSpans[0]", "resourceSpans[3].scopeSpans[0].spans[0]",
    ]


def test_a_span_declared_server_side_never_carries_the_callers_address():
    resource = {"service.name": "payment", "supportlens.side": "server"}
    (span,) = normalize_request(_payload(_span(), resource=resource), RULE, side="client", client_ip="203.0.113.9").spans
    assert (span.side, span.client_ip) == ("server", "")


# --- found by fuzzing (tests/test_fuzz_decoders.py) -----------------------------------------


def _with_attributes(*attributes):
    span = _span()
    return _payload(dict(span, attributes=span["attributes"] + list(attributes)))


def test_doubles_json_cannot_hold_are_kept_as_otlp_spells_them():
    # NaN and the infinities were stored as floats, which JSON writes as null: every reader rejected the span
    (span,) = normalize_request(_with_attributes(
        {"key": "ratio", "value": {"doubleValue": "NaN"}},
        {"key": "ceiling", "value": {"doubleValue": "Infinity"}},
        {"key": "floor", "value": {"doubleValue": "-Infinity"}},
    ), RULE, side="server").spans
    assert (span.attributes["ratio"], span.attributes["ceiling"], span.attributes["floor"]) == (
        "NaN", "Infinity", "-Infinity")
    assert decode(encode(span), Span) == span


@pytest.mark.parametrize(("asn", "expected"), [
    ({"intValue": "-5"}, "field `network.asn`: expected `int` >= 0"),  # was stored, then dead-lettered
    ({"doubleValue": "Infinity"}, "`network.asn` is not an integer: 'inf'"),  # was an OverflowError: a 500
    ({"stringValue": "AS3215"}, "`network.asn` is not an integer: 'AS3215'"),  # was Python's own words
])
def test_a_network_the_contract_rejects_rejects_the_span_in_words(asn, expected):
    result = normalize_request(_with_attributes({"key": "network.asn", "value": asn}), RULE, side="server")
    assert result.spans == []
    (reason,) = result.rejected
    assert reason == f"resourceSpans[0].scopeSpans[0].spans[0]: {expected}"


def test_a_network_name_over_the_contracts_limit_rejects_the_span():
    payload = _with_attributes({"key": "network.carrier.name", "value": {"stringValue": "x" * 300}})
    (reason,) = normalize_request(payload, RULE, side="server").rejected
    assert reason.endswith("field `network.isp`: expected `str` of length <= 256")


def test_numbers_int_cannot_read_are_rejected_in_words():
    for value, expected in [({"intValue": "abc"}, "`intValue` is not an integer: 'abc'"),
                            ({"doubleValue": "abc"}, "`doubleValue` is not a number: 'abc'")]:
        (reason,) = normalize_request(_with_attributes({"key": "k", "value": value}), RULE, side="server").rejected
        assert reason.endswith(expected)
    # "²" is a digit int() cannot read: an unreadable status is no status, not a rejection
    span = _span(attributes=[_attr("http.request_id", "req-42"), _attr("http.response.status_code", "²")])
    (normalized,) = normalize_request(_payload(span), RULE, side="server").spans
    assert normalized.http_status is None
