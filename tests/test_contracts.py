"""Event contracts: records round-trip; malformed input is rejected with a message naming the field."""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from supportlens.contracts import (
    Account,
    BehaviourEvent,
    Contact,
    CorrelatedRequest,
    Diagnosis,
    FaultReport,
    InvalidRecord,
    Network,
    Span,
    decode,
    decode_signal,
    encode,
)

SPAN = Span(
    request_id="5f0c8a52-8f0e-4d7e-9a51-0e4b6c2d9a10",
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    span_id="00f067aa0ba902b7",
    side="client",
    service="mobile-app",
    operation="POST /v1/orders",
    start_us=1_763_784_000_000_000,
    duration_us=182_000,
    status="error",
    http_status=503,
    error_code="UPSTREAM_ERROR",
    client_ip="203.0.113.7",
    user_id="user-000001",
    account_id="acct-00001",
    app_version="5.3.1",
    platform="ios",
    region="eu-west",
    network=Network(isp="Orange", asn=3215, connection_type="wifi"),
    attributes={"screen": "checkout", "retry": 1, "cached": False, "ratio": 0.5},
)
REPORT = FaultReport(
    report_id="rep-1",
    received_at_us=1_763_784_030_000_000,
    user_id="user-000001",
    account_id="acct-00001",
    client_ip="2001:db8::7",
    locale="zh-CN",
    request_ids=[SPAN.request_id],
    error_code="UPSTREAM_ERROR",
    user_message="付款一直失败。",
    client_log=[SPAN],
)
BEHAVIOUR = BehaviourEvent(event_id="ev-1", user_id="user-000001", ts_us=1, name="screen_view", screen="home")
ACCOUNT = Account(
    account_id="acct-00001",
    name="Customer 1",
    tier="vip",
    locale="zh-CN",
    channel="email",
    contacts=[Contact(name="Ops", email="ops@example.com")],
)


@pytest.mark.parametrize("record", [SPAN, REPORT, BEHAVIOUR, ACCOUNT], ids=lambda r: type(r).__name__)
def test_every_record_type_round_trips_through_json(record):
    data = encode(record)
    assert decode(data, type(record)) == record
    assert json.loads(data)  # plain JSON any consumer can read


def _json_with(record, **changes) -> bytes:
    """The record as JSON with fields changed; ``...`` removes a field."""
    raw = msgspec.to_builtins(record)
    for key, value in changes.items():
        if value is ...:
            raw.pop(key)
        else:
            raw[key] = value
    return json.dumps(raw, ensure_ascii=False).encode()


def _span_json(**changes) -> bytes:
    return _json_with(SPAN, **changes)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"request_id": "r1", ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "expected `object`, got `array`"),
        (_span_json(request_id=...), "missing required field `request_id`"),
        (_span_json(request_id=""), "field `request_id`: expected `str` of length >= 1"),
        (_span_json(request_id="has space"), "field `request_id`"),
        (_span_json(start_us="yesterday"), "field `start_us`: expected `int`, got `str`"),
        (_span_json(duration_us=-5), "field `duration_us`: expected `int` >= 0"),
        (_span_json(side="browser"), "field `side`: invalid enum value 'browser'"),
        (_span_json(http_status=999), "field `http_status`"),
        (_span_json(client_ip="300.1.2.3"), "`client_ip` is not an IP address"),
        (_span_json(network={"isp": "Orange", "asn": "AS3215"}), "field `network.asn`: expected `int`, got `str`"),
        (_span_json(attributes={"nested": [1, 2]}), "field `attributes[...]`"),
        (_span_json(error_message="x" * 5000), "field `error_message`: expected `str` of length <= 4096"),
    ],
)
def test_malformed_spans_are_rejected_naming_the_field(data, expected):
    with pytest.raises(InvalidRecord) as caught:
        decode(data, Span)
    assert expected in caught.value.reason
    assert str(caught.value).startswith("invalid span: ")


def test_oversized_records_are_rejected_before_parsing():
    big = _span_json(attributes={f"k{i}": "v" * 100 for i in range(100)})
    with pytest.raises(InvalidRecord) as caught:
        decode(big, Span, max_bytes=4096)
    assert f"record is {len(big):,} bytes, over the 4,096-byte limit" == caught.value.reason


def test_a_bad_span_inside_a_report_is_named_by_its_path():
    raw = msgspec.to_builtins(REPORT)
    raw["client_log"][0]["duration_us"] = "slow"
    with pytest.raises(InvalidRecord) as caught:
        decode(json.dumps(raw).encode(), FaultReport)
    assert caught.value.reason == "field `client_log[0].duration_us`: expected `int`, got `str`"


@pytest.mark.parametrize(
    ("record_type", "changes", "expected"),
    [
        (FaultReport, {"client_ip": ...}, "missing required field `client_ip`"),
        (FaultReport, {"locale": "fr"}, "field `locale`: invalid enum value 'fr'"),
        (FaultReport, {"request_ids": ["r"] * 51}, "field `request_ids`: expected `array` of length <= 50"),
        (BehaviourEvent, {"user_id": ...}, "missing required field `user_id`"),
        (Account, {"tier": "gold"}, "field `tier`: invalid enum value 'gold'"),
        (Account, {"contacts": [{"email": "not-an-address"}]}, "field `contacts[0].email`"),
    ],
)
def test_other_record_types_reject_bad_fields(record_type, changes, expected):
    base = {FaultReport: REPORT, BehaviourEvent: BEHAVIOUR, Account: ACCOUNT}[record_type]
    with pytest.raises(InvalidRecord) as caught:
        decode(_json_with(base, **changes), record_type)
    assert expected in caught.value.reason


def test_unknown_fields_are_kept_in_attributes_not_dropped():
    data = _span_json(**{"device_model": "Pixel 9", "battery": {"level": 0.4}, "schema_version": 2})
    span = decode(data, Span)
    assert span.attributes["device_model"] == "Pixel 9"
    assert json.loads(span.attributes["battery"]) == {"level": 0.4}
    assert span.attributes["screen"] == "checkout"  # existing attributes survive the merge
    assert span.schema_version == 2


def test_unknown_fields_do_not_smuggle_invalid_known_fields_through():
    with pytest.raises(InvalidRecord, match="field `start_us`"):
        decode(_span_json(start_us="x", device_model="Pixel"), Span)


# --- found by fuzzing (tests/test_fuzz_decoders.py) -----------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(("data", "expected"), [
    # msgspec raised UnicodeDecodeError and RecursionError, not DecodeError: they crashed the worker's agent
    (b'{"\x80": 1}', "not valid JSON (it holds bytes that are not UTF-8 text)"),
    (_span_json()[:-1] + b', "extra": ' + DEEP + b"}", "nested too deeply (arrays and objects inside each other)"),
])
def test_json_the_decoder_cannot_read_is_an_invalid_record_not_a_crash(data, expected):
    for record_type in (Span, FaultReport):
        with pytest.raises(InvalidRecord) as caught:
            decode(data, record_type)
        assert caught.value.reason == expected


def test_a_signal_with_bytes_that_are_not_utf8_is_an_invalid_record_not_a_crash():
    with pytest.raises(InvalidRecord, match="not valid JSON \\(it holds bytes that are not UTF-8 text\\)"):
        decode_signal(b'{"kind": "clock", "\x80": 1}')


def test_attributes_that_are_not_an_object_are_rejected_whatever_the_order_of_fields():
    # an unknown field before `attributes` used to replace them with {} and accept the record
    first = _span_json()[:-1] + b', "device": "Pixel", "attributes": "x"}'
    last = b'{"attributes": "x", "device": "Pixel", ' + _span_json()[1:].replace(b'"attributes"', b'"other"', 1)
    for data in (first, last):
        with pytest.raises(InvalidRecord, match="field `attributes`: expected `object`, got `str`"):
            decode(data, Span)


def test_an_unknown_field_of_a_record_without_attributes_is_named():
    record = CorrelatedRequest(request_id="r1", start_us=1, diagnosis=Diagnosis(cls="ok"))
    with pytest.raises(InvalidRecord) as caught:
        decode(_json_with(record, colour="red"), CorrelatedRequest)
    assert caught.value.reason == "field `colour` is not part of a correlated request"  # was: `attributes`


@pytest.mark.parametrize(("record_type", "base", "changes", "field"), [
    (Span, SPAN, {"request_id": "r-1\n"}, "request_id"),
    (Account, ACCOUNT, {"contacts": [{"email": "ops@example.com\n"}]}, "contacts[0].email"),
    (Account, ACCOUNT, {"webhook_url": "https://hooks.example.com/x\n"}, "webhook_url"),
])
def test_a_value_with_a_trailing_line_break_does_not_match_a_pattern(record_type, base, changes, field):
    # `$` matched before a final "\n": ids and addresses ended in a line break
    with pytest.raises(InvalidRecord, match=f"field `{re.escape(field)}`"):
        decode(_json_with(base, **changes), record_type)
