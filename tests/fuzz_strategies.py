"""Inputs for the fuzz tests: a valid record of every contract, and hypothesis strategies that break them.

Two families: *wild* input (arbitrary bytes, arbitrary JSON) and *structure-aware*
mutations of the valid records here (a field replaced, deleted, added, retyped or
stretched; odd unicode, numbers JSON cannot hold, deep nesting, huge strings), which
get past a decoder's first checks and reach the ones behind them.
"""

from __future__ import annotations

import base64
import copy
import gzip
import zlib
from typing import Any

import msgspec
from google.protobuf.json_format import ParseDict
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from supportlens.contracts import (
    Account,
    BehaviourEvent,
    Change,
    Contact,
    CorrelatedRequest,
    DeliveryAttempt,
    DiagnosedReport,
    Diagnosis,
    FaultReport,
    Hop,
    IncidentCommand,
    IncidentEvent,
    MisuseCount,
    MisuseDetection,
    Network,
    Notification,
    SignalClock,
    SignalCount,
    Span,
    SurgeEvent,
    Suspect,
)

T0 = 1_763_784_000_000_000

SPAN = Span(
    request_id="5f0c8a52-8f0e-4d7e-9a51-0e4b6c2d9a10", trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    span_id="00f067aa0ba902b7", side="client", service="mobile-app", operation="POST /v1/orders",
    start_us=T0, duration_us=182_000, status="error", http_status=503, error_code="UPSTREAM_ERROR",
    error_message="upstream answered 503", client_ip="203.0.113.7", user_id="user-000001",
    account_id="acct-00001", app_version="5.3.1", platform="ios", region="eu-west",
    network=Network(isp="Orange", asn=3215, connection_type="wifi"),
    attributes={"screen": "checkout", "retry": 1, "cached": False, "ratio": 0.5},
)
DIAGNOSIS = Diagnosis(cls="server_error", service="payment", team="payments", code="UPSTREAM_ERROR",
                      evidence="payment answered 503 after 12 ms", catalog_version=3)

# One valid record of every contract, with most optional fields set so mutations reach them.
RECORDS: dict[type, Any] = {
    Span: SPAN,
    FaultReport: FaultReport(
        report_id="rep-1", received_at_us=T0 + 30_000_000, user_id="user-000001", account_id="acct-00001",
        client_ip="2001:db8::7", locale="zh-CN", app_version="5.3.1", platform="ios", region="eu-west",
        network=Network(isp="Orange", asn=3215), request_ids=[SPAN.request_id], error_code="UPSTREAM_ERROR",
        user_message="付款一直失败。", client_log=[SPAN], attributes={"build": 77},
    ),
    BehaviourEvent: BehaviourEvent(event_id="ev-1", user_id="user-000001", account_id="acct-00001", ts_us=T0,
                                   name="screen_view", screen="home", app_version="5.3.1", platform="ios",
                                   region="eu-west", attributes={"from": "push"}),
    Account: Account(account_id="acct-00001", name="Customer 1", tier="vip", locale="zh-CN", channel="webhook",
                     webhook_url="https://hooks.example.com/supportlens",
                     contacts=[Contact(name="Ops", email="ops@example.com")], attributes={"plan": "gold"}),
    CorrelatedRequest: CorrelatedRequest(
        request_id=SPAN.request_id, version=3, trace_id=SPAN.trace_id, start_us=T0, operation="POST /v1/orders",
        user_id="user-000001", account_id="acct-00001", client_ip="203.0.113.7", app_version="5.3.1",
        platform="ios", region="eu-west", network=Network(isp="Orange"), has_client=True, has_server=True,
        client_duration_us=182_000, client_status="error", client_http_status=503,
        client_error_code="UPSTREAM_ERROR", server_duration_us=12_000, server_status="error",
        server_http_status=503, root_service="api", teams=["edge", "payments"],
        hops=[Hop(service="api", team="edge", span_id="a1", offset_us=1_000, duration_us=12_000, status="error",
                  http_status=503)],
        span_count=3, diagnosis=DIAGNOSIS, completeness="complete",
    ),
    DiagnosedReport: DiagnosedReport(
        report_id="rep-1", received_at_us=T0, diagnosed_at_us=T0 + 5_000_000, user_id="user-000001",
        client_ip="203.0.113.0", locale="en", request_ids=[SPAN.request_id], primary_request_id=SPAN.request_id,
        diagnosis=DIAGNOSIS, title="Payments are failing", explanation="Our payment service failed.",
        action="Try again in a few minutes.", doc_url="https://help.example.com/payments",
    ),
    SurgeEvent: SurgeEvent(surge_id="surge-1", phase="start", at_us=T0, started_at_us=T0, dimension="service",
                           value="payment", score=0.93, rate_per_min=120.5, baseline_per_min=3.0, reports=40,
                           failed_requests=900, affected_users=310, attributes={"bucket_s": 10}),
    IncidentEvent: IncidentEvent(
        incident_id="inc-1", sequence=1, transition="declared", at_us=T0, started_at_us=T0, severity="sev2",
        title="Payments failing", reason="surge on service=payment", root_key="service=payment",
        dimensions={"service": "payment", "region": "eu-west"}, services=["payment"], teams=["payments"],
        affected_users=310,
        suspects=[Suspect(change_id="chg-1", kind="deploy", service="payment", version="1.4.2", started_at_us=T0,
                          score=0.9, reason="payment 1.4.2 deployed 3 min before the surge, in the failing hop")],
    ),
    Change: Change(change_id="chg-1", kind="deploy", service="payment", version="1.4.2", from_version="1.4.1",
                   region="eu-west", platform="ios", started_at_us=T0, finished_at_us=T0 + 600_000_000, author="ann",
                   link="https://ci.example.com/pipelines/8812", description="retry budget for the card network",
                   attributes={"pipeline": 8812}),
    Notification: Notification(notification_id="n-1", account_id="acct-00001", kind="incident_declared",
                               created_at_us=T0, incident_id="inc-1", channel="webhook",
                               to="https://hooks.example.com/supportlens", subject="Payments failing",
                               body="We are working on it."),
    DeliveryAttempt: DeliveryAttempt(notification_id="n-1", attempt=1, account_id="acct-00001", at_us=T0,
                                     channel="webhook", outcome="delivered", detail="HTTP 204"),
    MisuseDetection: MisuseDetection(
        detection_id="idempotency-key-reuse:req-2", rule="idempotency-key-reuse", code="IDEMPOTENCY_KEY_REUSED",
        user_id="user-000001", account_id="acct-00001", at_us=T0, request_id="req-2", earlier_request_id="req-1",
        session_id="sess-1", evidence="POST /v1/orders reused the idempotency_key of request req-1",
        detected_at_us=T0 + 1),
}

SIGNALS: list[Any] = [
    SignalCount(source="worker-1", dimension="service", value="payment", bucket_start_us=T0, failed=3, reports=1,
                requests=40, users=[11, 42], active_users=[1, 11, 42], accounts=["acct-00001"]),
    MisuseCount(source="worker-1", account_id="acct-00001", code="RATE_LIMITED", at_us=T0, count=7),
    SignalClock(source="worker-1", watermark_us=T0, sent_at_us=T0 + 1),
    IncidentCommand(action="declare", at_us=T0, by="ann", reason="customers call", title="Payments",
                    dimensions={"service": "payment"}, severity="sev1"),
]


def plain(record: Any) -> Any:
    """The record as the JSON values it encodes to (dicts, lists, strings, numbers)."""
    return msgspec.to_builtins(record)


# --- OTLP ---------------------------------------------------------------------------------

def _kv(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "value": value}


def otlp_span_json(request_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331",
        "parentSpanId": "00f067aa0ba902b7", "name": "POST /v1/orders", "kind": 3,
        "startTimeUnixNano": "1763784000000000000", "endTimeUnixNano": "1763784000250000000",
        "status": {"code": 2, "message": "upstream answered 503"},
        "attributes": [
            _kv("http.request_id", {"stringValue": request_id}),
            _kv("http.response.status_code", {"intValue": "503"}),
            _kv("error.code", {"stringValue": "UPSTREAM_ERROR"}),
            _kv("retry", {"intValue": 2}),
            _kv("ratio", {"doubleValue": 0.25}),
            _kv("cached", {"boolValue": False}),
            _kv("tags", {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "1"}]}}),
            _kv("ctx", {"kvlistValue": {"values": [_kv("k", {"stringValue": "v"})]}}),
            _kv("blob", {"bytesValue": "AAEC"}),
        ],
        **extra,
    }


# An ExportTraceServiceRequest in OTLP/JSON: a consented client app and a backend service.
OTLP_REQUEST: dict[str, Any] = {
    "resourceSpans": [
        {
            "resource": {"attributes": [
                _kv("service.name", {"stringValue": "shop-app"}),
                _kv("supportlens.consent", {"stringValue": "granted"}),
                _kv("service.version", {"stringValue": "5.3.1"}),
                _kv("os.type", {"stringValue": "ios"}),
                _kv("enduser.id", {"stringValue": "user-000001"}),
                _kv("network.carrier.name", {"stringValue": "Orange"}),
                _kv("network.asn", {"intValue": "3215"}),
                _kv("network.connection.type", {"stringValue": "wifi"}),
            ]},
            "scopeSpans": [{"scope": {"name": "app"}, "spans": [otlp_span_json("req-1")]}],
        },
        {
            "resource": {"attributes": [
                _kv("service.name", {"stringValue": "payment"}),
                _kv("supportlens.side", {"stringValue": "server"}),
                _kv("cloud.region", {"stringValue": "eu-west"}),
            ]},
            "scopeSpans": [{"spans": [otlp_span_json("req-1", spanId="c7ad6b7169203332")]}],
        },
    ]
}


def otlp_request_proto(payload: dict[str, Any] = OTLP_REQUEST) -> bytes:
    """The JSON request above as protobuf bytes (ids from hex to bytes, as the wire carries them)."""
    wire = copy.deepcopy(payload)
    for resource_spans in wire["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return ParseDict(wire, ExportTraceServiceRequest()).SerializeToString()


# --- wild values --------------------------------------------------------------------------

# Keys the decoders look at, so mutations that add a field often add one that matters.
FIELD_NAMES = sorted(
    {name for cls in [*RECORDS, *map(type, SIGNALS), Network, Hop, Diagnosis, Contact]
     for name in cls.__struct_fields__} | {"kind"}
)
OTLP_KEYS = [
    "resourceSpans", "scopeSpans", "spans", "resource", "attributes", "key", "value", "traceId", "spanId",
    "parentSpanId", "name", "startTimeUnixNano", "endTimeUnixNano", "status", "code", "message", "stringValue",
    "intValue", "doubleValue", "boolValue", "bytesValue", "arrayValue", "kvlistValue", "values",
    "http.request_id", "http.response.status_code", "http.status_code", "network.asn", "supportlens.side",
    "supportlens.consent", "service.name", "client.address", "enduser.id", "error.code", "network.carrier.name",
]
ODD_STRINGS = [
    "", " ", "NaN", "Infinity", "-Infinity", "-0", "1e400", "null", "true", "[]", "{}", "\x00", "\x7f", "\t\n",
    "abc\n", "\nabc", "a b", "\u202etxt.exe", "\ufeff", "\u2028\u2029", "e\u0301", "👩‍👩‍👧‍👦", "\U0010ffff",
    "\uffff", "付款一直失败。", "ﷺ", "' OR 1=1 --", "%s%n%x", "../../etc/passwd", "<script>", "granted",
    "server", "client", "203.0.113.7", "::1", "999.1.1.1", "2001:db8::7%eth0", "ops@example.com",
    "https://x", "http://a b", "2", "503", "²", "٣", "0x10", "1_000", " 12 ",
]
# JSON text a Python value cannot express: numbers out of range, bad escapes, invalid UTF-8.
RAW_TOKENS = [
    b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"-0", b"-0.0", b"1e-400", b"18446744073709551616",
    b"-9223372036854775809", b"9" * 500, b"1E2", b"01", b"+1", b".5", b"1.", b"0x10", b"tru", b"nul",
    b'"\\ud800"', b'"\\udc00x"', b'"\xff\xfe"', b'"\xc3"', b'"\\u0000"', b'"\\x41"', b'"\\"', b'"\t"',
    b'"' + "é".encode() * 300 + b'"',
]
BOUNDARY_INTS = [
    0, -1, 1, 99, 100, 599, 600, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
    86_400_000_000, 86_400_000_001, 32_503_680_000_000_000, 32_503_680_000_000_001, 10**30,
]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(BOUNDARY_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=24),
    st.sampled_from(ODD_STRINGS),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
huge_strings = st.builds(
    lambda char, n: char * n, st.sampled_from(["x", "é", "😀", "\x00", " ", "a\n"]), st.integers(129, 70_000)
)
deep_nesting = st.builds(
    lambda depth, kind: msgspec.Raw(
        b"[" * depth + b"]" * depth if kind == "array"
        else b'{"a":' * depth + b"1" + b"}" * depth if kind == "object"
        else b'[{"a":' * depth + b"1" + b"}]" * depth
    ),
    st.integers(1, 20_000),
    st.sampled_from(["array", "object", "mixed"]),
)
raw_tokens = st.sampled_from(RAW_TOKENS).map(msgspec.Raw)


def _nested_any_value(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"stringValue": "leaf"}
    for level in range(depth):
        value = ({"arrayValue": {"values": [value]}} if level % 2
                 else {"kvlistValue": {"values": [{"key": "k", "value": value}]}})
    return value


# An OTLP AnyValue nested deep (up to ~350 levels of JSON); deeper ones would overflow the
# stack of the mutations above (they walk and print the tree), not only of the decoders.
deep_any_values = st.integers(1, 100).map(_nested_any_value)
# Anything that can stand where a JSON value stands, including text no Python value encodes to.
wild_values = st.one_of(json_values, json_values, huge_strings, raw_tokens, deep_nesting)
# The same without raw JSON text: what a JSON decoder could have produced (for dict-level inputs).
decoded_values = st.one_of(json_values, json_values, huge_strings)
# ... and for OTLP payloads, also attribute values nested deep.
otlp_values = st.one_of(json_values, json_values, huge_strings, deep_any_values)
field_names = st.one_of(st.sampled_from(FIELD_NAMES), st.sampled_from(OTLP_KEYS), st.text(max_size=16))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found.extend(_paths(inner, (*prefix, key)))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found.extend(_paths(inner, (*prefix, index)))
    return found


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def retyped(value: Any) -> list[Any]:
    """The same information in other JSON types: where a decoder expects one, it gets another."""
    # a raw JSON token's text, not its repr: that holds a memory address, which differs between
    # runs and made hypothesis replay a case with other data ("Inconsistent data generation")
    text = bytes(memoryview(value)).decode("utf-8", "replace") if isinstance(value, msgspec.Raw) else str(value)
    return [text, [value], {"value": value}, None, True, 0, -1, 1.5, "" if value else "x"]


# One edit grows a value to at most about this: past the 1 MiB record limit, but repeated
# edits of what an earlier one grew must not multiply into gigabytes.
GROWTH_BYTES = 1_100_000


def mutate(draw: st.DrawFn, original: Any, values: st.SearchStrategy[Any], max_steps: int = 4) -> Any:
    """``original`` (not changed) with 1…``max_steps`` random edits anywhere in its tree."""
    tree = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, max_steps))):
        paths = _paths(tree)
        path = draw(st.sampled_from(paths))
        target = _get(tree, path)
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "retype", "repeat", "stretch"]))
        if op == "add" and isinstance(target, dict):
            target[draw(field_names)] = draw(values)
            continue
        if op == "add" and isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), draw(values))
            continue
        if not path:  # the whole record: only replacing it makes sense
            if op in ("replace", "retype"):
                tree = draw(values) if op == "replace" else draw(st.sampled_from(retyped(tree)))
            continue
        parent, step = _get(tree, path[:-1]), path[-1]
        if op == "delete":
            del parent[step]
        elif op == "retype":
            parent[step] = draw(st.sampled_from(retyped(target)))
        elif op == "repeat" and isinstance(target, list) and target:
            times = draw(st.sampled_from([2, 51, 129, 201, 1025]))  # past each list limit of the contracts
            # copies, not references: a later edit of one repetition must not grow them all
            repeated = target * max(1, min(times, GROWTH_BYTES // len(to_json(target))))
            parent[step] = [copy.deepcopy(item) for item in repeated]
        elif op == "stretch" and isinstance(target, str):
            text = target or "x"
            parent[step] = text * max(1, min(draw(st.integers(2, 5000)), GROWTH_BYTES // len(text.encode())))
        elif op == "stretch" and isinstance(target, int) and not isinstance(target, bool):
            parent[step] = draw(st.sampled_from(BOUNDARY_INTS))
        else:
            parent[step] = draw(values)
    return tree


@st.composite
def mutations_of(draw: st.DrawFn, original: Any, max_steps: int = 4) -> Any:
    """Valid-record mutations that may hold raw JSON tokens: encode with :func:`to_json`."""
    return mutate(draw, original, wild_values, max_steps)


@st.composite
def decoded_mutations_of(draw: st.DrawFn, original: Any, max_steps: int = 4,
                         values: st.SearchStrategy[Any] = decoded_values) -> Any:
    """Mutations a JSON decoder could have produced (no raw tokens): inputs for dict-level functions."""
    return mutate(draw, original, values, max_steps)


def to_json(value: Any) -> bytes:
    return msgspec.json.encode(value)


@st.composite
def garbled(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with bytes flipped, cut, inserted or repeated: what a broken producer or network sends."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "truncate"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and at < len(out):
            out[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del out[at:at + draw(st.integers(1, 16))]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            out[at:at] = bytes(out[at:at + draw(st.integers(1, 64))]) * draw(st.integers(1, 8))
        else:
            del out[at:]
    return bytes(out)


def json_bytes_for(valid: Any) -> st.SearchStrategy[bytes]:
    """Every kind of bad body for a decoder that expects ``valid``'s shape."""
    encoded = to_json(valid)
    return st.one_of(
        mutations_of(valid, max_steps=1).map(to_json),  # one edit: most of the record still valid
        mutations_of(valid).map(to_json),
        mutations_of(valid).map(to_json),
        garbled(encoded),
        wild_values.map(to_json),
        st.binary(max_size=512),
    )


# --- compression --------------------------------------------------------------------------

ENCODINGS = ["gzip", "deflate", "x-gzip", "GZIP", " deflate ", "identity", "", "br", "zstd", "gzip, deflate",
             "compress", "*"]


def compress(data: bytes, encoding: str, level: int = 6) -> bytes:
    """``data`` in an HTTP content coding: gzip, or deflate (which HTTP means as zlib format)."""
    return gzip.compress(data, level, mtime=0) if "gzip" in encoding.lower() else zlib.compress(data, level)


# --- OTLP protobuf, built field by field ----------------------------------------------------

ATTRIBUTE_KEYS = [
    "http.request_id", "http.response.status_code", "http.status_code", "network.asn", "supportlens.network.asn",
    "network.carrier.name", "network.connection.type", "client.address", "enduser.id", "service.version",
    "os.type", "cloud.region", "error.code", "supportlens.account_id", "supportlens.side",
    "supportlens.consent", "supportlens.drill", "service.name",
]


def any_values(depth: int = 2) -> st.SearchStrategy[AnyValue]:
    scalars = st.one_of(
        st.builds(lambda v: AnyValue(string_value=v), st.one_of(st.text(max_size=40), st.sampled_from(ODD_STRINGS))),
        st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
        st.builds(lambda v: AnyValue(int_value=v), st.one_of(
            st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 100, 503, 599, 600, -1, 2**63 - 1, -(2**63)]))),
        st.builds(lambda v: AnyValue(double_value=v), st.floats()),  # NaN and infinities too
        st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=24)),
        st.just(AnyValue()),  # no value set at all
    )
    if depth == 0:
        return scalars
    inner = any_values(depth - 1)
    return st.one_of(
        scalars,
        st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(inner, max_size=3)),
        st.builds(lambda kvs: AnyValue(kvlist_value=KeyValueList(values=kvs)),
                  st.lists(st.builds(KeyValue, key=st.text(max_size=8), value=inner), max_size=3)),
    )


key_values = st.builds(
    KeyValue, key=st.one_of(st.sampled_from(ATTRIBUTE_KEYS), st.text(max_size=12)), value=any_values()
)
consented_resource = st.sampled_from([
    [KeyValue(key="supportlens.consent", value=AnyValue(string_value="granted"))],
    [KeyValue(key="supportlens.side", value=AnyValue(string_value="server")),
     KeyValue(key="service.name", value=AnyValue(string_value="payment"))],
    [],
])
nanos = st.one_of(st.integers(0, 2**64 - 1), st.integers(1_763_784_000_000_000_000, 1_763_784_010_000_000_000))


@st.composite
def proto_spans(draw: st.DrawFn) -> ProtoSpan:
    start = draw(nanos)
    end = draw(st.one_of(st.integers(start, min(start + 10**12, 2**64 - 1)), nanos))  # mostly a plausible duration
    return ProtoSpan(
        trace_id=draw(st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20))),
        span_id=draw(st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=10))),
        parent_span_id=draw(st.binary(max_size=8)),
        name=draw(st.text(max_size=40)),
        kind=draw(st.integers(0, 5)),
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=draw(st.lists(key_values, max_size=6)),
        status=Status(code=draw(st.integers(0, 2)), message=draw(st.text(max_size=30))),
    )


proto_requests = st.builds(
    lambda resources: ExportTraceServiceRequest(resource_spans=resources),
    st.lists(
        st.builds(
            lambda own, more, spans: ResourceSpans(
                resource=Resource(attributes=own + more), scope_spans=[ScopeSpans(spans=spans)]
            ),
            consented_resource, st.lists(key_values, max_size=4), st.lists(proto_spans(), max_size=3),
        ),
        max_size=3,
    ),
)


def proto_bodies() -> st.SearchStrategy[bytes]:
    """Protobuf export requests: built from random fields, and valid ones garbled on the wire."""
    valid = otlp_request_proto()
    return st.one_of(
        proto_requests.map(lambda message: message.SerializeToString()),
        proto_requests.map(lambda message: message.SerializeToString()),
        garbled(valid),
        st.binary(max_size=512),
    )
