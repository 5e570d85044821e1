"""Fuzzing every decoder (issue #8): whatever the bytes, a typed record or a reason a person can read.

Each test feeds one decoder wild input (arbitrary bytes and JSON) and structure-aware
mutations of valid records (``fuzz_strategies``). The properties: only the documented
exception escapes (:class:`InvalidRecord`, :class:`RequestRejected` with a 4xx, or
:class:`UserError`); its reason is non-empty, in words, and names the field where there
is one; what is accepted re-encodes and decodes to the same value; nothing hangs (the
profile's deadline). The Kafka test at the end sends such records to a real worker:
every one lands on the dead-letter topic with its reason and origin, and the worker goes on.
"""

from __future__ import annotations

import csv
import io
import re
import string
import time
import zlib
from typing import Any

import msgspec
import pytest
from confluent_kafka import Producer
from hypothesis import Phase, assume, given
from hypothesis import strategies as st

import fuzz_strategies as fs
from fuzzing import assert_readable, case, fuzz_settings
from helpers import WorkerProcess, spans_in_records
from supportlens.span_batches import decode_spans, partition_of
from sinks.clickhouse_rows import MAPPINGS, RecordMeta, to_landing_json, to_row
from streams.dead_letters import MAX_REASON_BYTES, dead_letter_headers
from supportlens import accounts, contracts, otlp
from supportlens.config import Settings
from supportlens.contracts import (
    KIND_NAMES,
    Account,
    BehaviourEvent,
    Change,
    CorrelatedRequest,
    DeliveryAttempt,
    DiagnosedReport,
    FaultReport,
    IncidentEvent,
    InvalidRecord,
    MisuseDetection,
    Notification,
    Span,
    SurgeEvent,
)
from supportlens.errors import UserError
from supportlens.gateway import ingest, otlp_wire
from supportlens.gateway.addresses import ClientAddressPolicy
from supportlens.gateway.ingest import RequestRejected
from supportlens.topic_reader import read_range
from supportlens.topics import provision

MAX_BYTES = 1_048_576  # the default max_record_bytes


def _span_order(span: Span) -> tuple[str, str, int]:
    return span.request_id, span.span_id, span.start_us
LIMIT = 4096  # a gateway's small limit, so bodies cross it
RECORD_TYPES = list(contracts.KIND_NAMES)
ID_FIELDS: dict[type, tuple[str, ...]] = {
    Span: ("request_id",), FaultReport: ("report_id",), BehaviourEvent: ("event_id", "user_id"),
    Account: ("account_id",), CorrelatedRequest: ("request_id",), DiagnosedReport: ("report_id",),
    SurgeEvent: ("surge_id",), IncidentEvent: ("incident_id",), Notification: ("notification_id", "account_id"),
    DeliveryAttempt: ("notification_id", "account_id"), Change: ("change_id",), MisuseDetection: ("detection_id",),
}
VISIBLE_ASCII_ID = re.compile(r"[\x21-\x7e]{1,128}")


# --- the properties, shared by the tests below --------------------------------------------


def assert_round_trips(record: Any) -> None:
    """An accepted record encodes to JSON that decodes, strictly, to the same record."""
    encoded = contracts.encode(record)
    if isinstance(record, contracts.Signal):  # type: ignore[arg-type]
        again: Any = contracts.decode_signal(encoded, len(encoded))
    else:
        again = contracts.decode(encoded, type(record), len(encoded))
    assert again == record
    assert contracts.encode(again) == encoded
    for name in ID_FIELDS.get(type(record), ()):
        assert VISIBLE_ASCII_ID.fullmatch(getattr(record, name)), (name, getattr(record, name))


def decoded_or_reason(data: bytes, record_type: type, max_bytes: int = MAX_BYTES) -> Any:
    """The record, or the :class:`InvalidRecord` it was rejected with, both checked."""
    try:
        record = contracts.decode(data, record_type, max_bytes)
    except InvalidRecord as exc:
        assert exc.kind == KIND_NAMES[record_type]
        assert_readable(exc.reason)
        return exc
    assert type(record) is record_type
    assert_round_trips(record)
    return record


def assert_rejected_well(exc: RequestRejected, statuses: tuple[int, ...] = (400, 413, 415)) -> None:
    assert exc.status in statuses, (exc.status, exc.message)
    assert_readable(exc.message)


# --- the valid corpus is valid (else every mutation test proves little) ----------------------


@pytest.mark.parametrize("record", [*fs.RECORDS.values(), *fs.SIGNALS], ids=lambda r: type(r).__name__)
def test_the_valid_records_the_fuzzers_start_from_are_valid(record):
    assert_round_trips(record)


def test_the_valid_otlp_request_normalizes_completely_in_both_encodings():
    rule = otlp.RequestIdRule(("http.request_id",))
    as_json = otlp.normalize_request(fs.OTLP_REQUEST, rule, "client")
    proto = otlp_wire.decode_export_request(fs.otlp_request_proto(), otlp_wire.Encoding.PROTOBUF)
    as_proto = otlp.normalize_request(proto, rule, "client")
    assert as_json.rejected == [] and len(as_json.spans) == 2
    assert as_proto.rejected == [] and as_proto.spans == as_json.spans


# --- contracts.decode ----------------------------------------------------------------------


@fuzz_settings(500)
@given(record_type=st.sampled_from(RECORD_TYPES), data=st.one_of(
    st.binary(max_size=1024),
    fs.wild_values.map(fs.to_json),
    st.sampled_from(list(fs.RECORDS.values())).flatmap(lambda r: fs.garbled(contracts.encode(r))),
))
def test_decode_takes_any_bytes_for_every_record_type(record_type, data):
    case("contracts.decode")
    decoded_or_reason(data, record_type)


@pytest.mark.parametrize("record_type", RECORD_TYPES, ids=lambda t: t.__name__)
@fuzz_settings(100)
@given(data=st.data(), max_bytes=st.sampled_from([MAX_BYTES, LIMIT]))
def test_decode_takes_any_mutation_of_a_valid_record(record_type, data, max_bytes):
    case("contracts.decode")
    value = data.draw(fs.mutations_of(fs.plain(fs.RECORDS[record_type])), label="record")
    decoded_or_reason(fs.to_json(value), record_type, max_bytes)


@fuzz_settings(400)
@given(record_type=st.sampled_from(RECORD_TYPES), data=st.data())
def test_a_record_with_one_bad_field_is_rejected_naming_that_field(record_type, data):
    case("contracts.decode")
    valid = fs.plain(fs.RECORDS[record_type])
    field = data.draw(st.sampled_from(sorted(valid)), label="field")
    value = data.draw(st.one_of(fs.wild_values, st.sampled_from(fs.retyped(valid[field]))), label="value")
    outcome = decoded_or_reason(fs.to_json({**valid, field: value}), record_type)
    if isinstance(outcome, InvalidRecord) and not outcome.reason.startswith(
            ("record is", "not valid JSON", "nested too deeply")):
        assert f"`{field}" in outcome.reason, outcome.reason


@fuzz_settings(300)
@given(record_type=st.sampled_from(RECORD_TYPES), data=st.data(), text=st.one_of(
    st.text(max_size=130), st.sampled_from(fs.ODD_STRINGS),
    st.text(string.printable, max_size=130), st.sampled_from(["acct-00001", "x" * 128]),
))
def test_ids_are_visible_ascii_whatever_is_sent(record_type, data, text):
    case("contracts.decode")
    valid = fs.plain(fs.RECORDS[record_type])
    field = data.draw(st.sampled_from(ID_FIELDS[record_type]), label="field")
    ending = data.draw(st.sampled_from(["", "\n", "\r\n", " ", "\t"]), label="ending")
    # an accepted id is checked against the contract's promise by assert_round_trips
    decoded_or_reason(fs.to_json({**valid, field: text + ending}), record_type)


@fuzz_settings(300)
@given(record_type=st.sampled_from(RECORD_TYPES), name=st.text(max_size=16), value=fs.decoded_values)
def test_unknown_fields_are_kept_in_attributes_or_named_in_the_rejection(record_type, name, value):
    case("contracts.decode")
    valid = fs.plain(fs.RECORDS[record_type])
    assume(name not in record_type.__struct_fields__)
    outcome = decoded_or_reason(fs.to_json({**valid, name: value}), record_type)
    if "attributes" not in record_type.__struct_fields__:
        assert isinstance(outcome, InvalidRecord) and f"`{name}`" in outcome.reason, outcome
        return
    if isinstance(outcome, InvalidRecord):  # only a value the contract's limits forbid
        assert outcome.reason.startswith("field `attributes"), outcome.reason
        return
    kept = valid.get("attributes", {}).get(name, value)
    assert outcome.attributes[name] == (kept if isinstance(kept, (str, int, float, bool)) else fs.to_json(kept).decode())


@fuzz_settings(300)
@given(record_type=st.sampled_from(RECORD_TYPES), data=st.data())
def test_the_order_of_fields_does_not_change_the_verdict(record_type, data):
    case("contracts.decode")
    value = data.draw(fs.decoded_mutations_of(fs.plain(fs.RECORDS[record_type])), label="record")
    assume(isinstance(value, dict) and len(value) > 1)
    order = data.draw(st.permutations(list(value)), label="order")
    first = decoded_or_reason(fs.to_json(value), record_type)
    second = decoded_or_reason(fs.to_json({key: value[key] for key in order}), record_type)
    if isinstance(first, InvalidRecord):
        assert isinstance(second, InvalidRecord), (first, second)
    else:
        assert second == first


# --- contracts.decode_signal ---------------------------------------------------------------


@fuzz_settings(400)
@given(data=st.one_of(
    st.sampled_from(fs.SIGNALS).flatmap(lambda s: fs.json_bytes_for(fs.plain(s))),  # with its `kind` tag
    st.binary(max_size=512),
))
def test_decode_signal_takes_any_bytes(data):
    case("contracts.decode_signal")
    try:
        signal = contracts.decode_signal(data)
    except InvalidRecord as exc:
        assert exc.kind == "signal"
        assert_readable(exc.reason)
        return
    assert_round_trips(signal)


# --- OTLP normalization --------------------------------------------------------------------

RULES = st.sampled_from([
    otlp.RequestIdRule(("http.request_id",)),
    otlp.RequestIdRule(("http.request_id", "enduser.id"), from_trace_id=False),
    otlp.RequestIdRule(()),
])


def assert_normalized_well(spans: list[Span], reasons: list[str]) -> None:
    """Every span valid; every rejection says where (its path, or its request) and why."""
    for span in spans:
        assert_round_trips(span)
    for reason in reasons:
        where, sep, why = reason.partition(": ")
        assert (where.startswith("resourceSpans") and sep) or reason.startswith("span of request "), reason
        assert_readable(why or reason)


@fuzz_settings(400)
@given(payload=st.one_of(fs.decoded_mutations_of(fs.OTLP_REQUEST, 6, fs.otlp_values), fs.decoded_values),
       rule=RULES, side=st.sampled_from(["client", "server"]), client_ip=st.sampled_from(["", "203.0.113.7"]))
def test_normalize_request_takes_any_json(payload, rule, side, client_ip):
    case("otlp.normalize_request")
    if not isinstance(payload, dict):
        payload = {"resourceSpans": payload}
    out = otlp.normalize_request(payload, rule, side, client_ip)
    assert_normalized_well(out.spans, out.rejected)


def check_accept_spans(payload: dict[str, Any], anonymize: bool = False) -> None:
    policy = ClientAddressPolicy(anonymize=anonymize)
    try:
        batch = ingest.accept_spans(payload, otlp.RequestIdRule(("http.request_id",)), "203.0.113.7", policy,
                                    MAX_BYTES)
    except RequestRejected as exc:
        assert_rejected_well(exc, (400,))
        return
    assert_normalized_well(batch.spans, batch.reasons)
    assert batch.refused == batch.rejected + batch.withheld
    if batch.refused:
        assert_readable(batch.message())
    records = ingest.span_records(batch.spans, 6, MAX_BYTES)
    for topic in ("client-spans", "server-spans"):
        sent = spans_in_records([r for r in records if r.topic == topic], 6)
        assert sorted(sent, key=_span_order) == sorted((s for s in batch.spans if f"{s.side}-spans" == topic),
                                                       key=_span_order)


@fuzz_settings(400)
@given(payload=fs.decoded_mutations_of(fs.OTLP_REQUEST, 6, fs.otlp_values), anonymize=st.booleans())
def test_accept_spans_takes_any_json(payload, anonymize):
    case("ingest.accept_spans")
    if not isinstance(payload, dict):
        payload = {"resourceSpans": payload}
    check_accept_spans(payload, anonymize)


# --- the OTLP wire: protobuf and JSON bodies -------------------------------------------------


@fuzz_settings(400)
@given(body=fs.proto_bodies())
def test_decode_export_request_takes_any_protobuf_body(body):
    case("otlp_wire.decode_export_request")
    try:
        payload = otlp_wire.decode_export_request(body, otlp_wire.Encoding.PROTOBUF)
    except RequestRejected as exc:
        assert_rejected_well(exc, (400,))
        return
    assert isinstance(payload, dict)
    check_accept_spans(payload)


@fuzz_settings(300)
@given(body=fs.json_bytes_for(fs.OTLP_REQUEST))
def test_decode_export_request_takes_any_json_body(body):
    case("otlp_wire.decode_export_request")
    try:
        payload = otlp_wire.decode_export_request(body, otlp_wire.Encoding.JSON)
    except RequestRejected as exc:
        assert_rejected_well(exc, (400,))
        return
    check_accept_spans(payload)


@fuzz_settings(200)
@given(content_type=st.one_of(
    st.text(max_size=40),
    st.sampled_from(["application/json", "APPLICATION/X-PROTOBUF", "application/json; charset=utf-8",
                     "application/protobuf", "text/plain", ""]),
))
def test_encoding_of_takes_any_content_type(content_type):
    case("otlp_wire.encoding_of")
    try:
        encoding = otlp_wire.encoding_of(content_type)
    except RequestRejected as exc:
        assert_rejected_well(exc, (415,))
        return
    assert encoding.value == content_type.lower()


# --- request bodies: compression ------------------------------------------------------------


def decompressed_or_rejected(body: bytes, encoding: str, limit: int = LIMIT) -> bytes | RequestRejected:
    try:
        data = ingest.decompress_body(body, encoding, limit)
    except RequestRejected as exc:
        assert_rejected_well(exc)
        return exc
    assert len(data) <= limit or encoding.strip().lower() in ("", "identity")
    return data


@fuzz_settings(300)
@given(body=st.binary(max_size=2048), encoding=st.one_of(st.sampled_from(fs.ENCODINGS), st.text(max_size=12)))
def test_decompress_body_takes_any_bytes_in_any_encoding(body, encoding):
    case("ingest.decompress_body")
    decompressed_or_rejected(body, encoding)


@fuzz_settings(300)
@given(data=st.one_of(st.binary(max_size=3 * LIMIT), st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8),
                                                                 st.integers(1, 3 * LIMIT))),
       encoding=st.sampled_from(["gzip", "deflate", "x-gzip", "GZIP", " deflate "]), level=st.integers(0, 9))
def test_decompress_body_gives_back_what_was_compressed_up_to_the_limit(data, encoding, level):
    case("ingest.decompress_body")
    outcome = decompressed_or_rejected(fs.compress(data, encoding, level), encoding)
    if len(data) <= LIMIT:
        assert outcome == data
    else:
        assert isinstance(outcome, RequestRejected) and outcome.status == 413


@fuzz_settings(300)
@given(data=st.data(), encoding=st.sampled_from(["gzip", "deflate"]))
def test_decompress_body_rejects_garbled_streams_without_crashing(data, encoding):
    case("ingest.decompress_body")
    original = data.draw(st.binary(min_size=1, max_size=LIMIT), label="original")
    body = data.draw(st.one_of(
        fs.garbled(fs.compress(original, encoding)),
        st.just(fs.compress(original, encoding) * 2),  # two streams back to back
        st.builds(lambda tail: fs.compress(original, encoding) + tail, st.binary(min_size=1, max_size=8)),
        st.just(zlib.compress(original)[2:-4]),  # raw deflate, as some clients wrongly send it
    ), label="body")
    decompressed_or_rejected(body, encoding)


@fuzz_settings(40)
@given(size=st.integers(LIMIT + 1, 4_000_000), fill=st.sampled_from([b"\0", b"{", b"ab"]),
       encoding=st.sampled_from(["gzip", "deflate"]))
def test_decompression_bombs_stop_at_the_limit(size, fill, encoding):
    case("ingest.decompress_body")
    bomb = fs.compress((fill * size)[:size], encoding, 9)
    outcome = decompressed_or_rejected(bomb, encoding)
    assert isinstance(outcome, RequestRejected) and outcome.status == 413, outcome


# --- gateway bodies: fault reports and behaviour ---------------------------------------------

REPORT_BODY = {k: v for k, v in fs.plain(fs.RECORDS[FaultReport]).items() if k not in ("received_at_us", "client_ip")}
EVENT_BODY = fs.plain(fs.RECORDS[BehaviourEvent])


@fuzz_settings(400)
@given(body=fs.json_bytes_for(REPORT_BODY), anonymize=st.booleans())
def test_accept_fault_report_takes_any_body(body, anonymize):
    case("ingest.accept_fault_report")
    try:
        accepted = ingest.accept_fault_report(
            body, received_at_us=fs.T0, client_ip="203.0.113.7", new_report_id=lambda: "generated-1",
            policy=ClientAddressPolicy(anonymize=anonymize), max_bytes=LIMIT,
        )
    except RequestRejected as exc:
        assert_rejected_well(exc, (400, 413))
        return
    report = accepted.report
    assert (report.received_at_us, report.client_ip) == (fs.T0, "203.0.113.7")  # the gateway's, as given
    records = accepted.records(6, LIMIT)
    assert records[0].topic == "fault-reports" and {r.topic for r in records[1:]} <= {"client-spans"}
    assert_round_trips(contracts.decode(records[0].value, FaultReport))
    attached = spans_in_records(records[1:], 6)
    assert len(attached) == len(report.client_log)
    for span in attached:
        assert_round_trips(span)
        assert span.side == "client" and span.attributes[ingest.ATTACHED_TO_REPORT] == report.report_id


@fuzz_settings(400)
@given(body=st.one_of(fs.json_bytes_for(EVENT_BODY), fs.json_bytes_for([EVENT_BODY, EVENT_BODY])))
def test_decode_behaviour_takes_any_body(body):
    case("ingest.decode_behaviour")
    try:
        events = ingest.decode_behaviour(body, LIMIT)
    except RequestRejected as exc:
        assert_rejected_well(exc, (400, 413))
        return
    for record, event in zip(ingest.behaviour_records(events), events, strict=True):
        assert record.key == event.user_id
        assert_round_trips(contracts.decode(record.value, BehaviourEvent))


CHANGE_BODY = fs.plain(fs.RECORDS[Change])


@fuzz_settings(400)
@given(body=st.one_of(fs.json_bytes_for(CHANGE_BODY), fs.json_bytes_for([CHANGE_BODY, CHANGE_BODY])))
def test_decode_changes_takes_any_body(body):
    case("ingest.decode_changes")
    try:
        changes = ingest.decode_changes(body, LIMIT, fs.T0)
    except RequestRejected as exc:
        assert_rejected_well(exc, (400, 413))
        return
    assert changes
    for record, change in zip(ingest.change_records(changes), changes, strict=True):
        assert (record.topic, record.key) == ("changes", change.change_id)
        assert_round_trips(contracts.decode(record.value, Change))


# --- the accounts import ---------------------------------------------------------------------

CELLS: dict[str, st.SearchStrategy[str]] = {
    "account_id": st.sampled_from(["acct-1", "acct-2", "acct-1", "a b", "ünï", "x" * 129, ""]),
    "name": st.sampled_from(["Customer 1", "A, B", 'say "hi"', "x" * 300]),
    "tier": st.sampled_from(["vip", "VIP", "standard", "gold", ""]),
    "locale": st.sampled_from(["en", "zh-CN", "zh-cn", "fr", ""]),
    "channel": st.sampled_from(["webhook", "email", "none", "sms", "", "Email"]),
    "webhook_url": st.sampled_from(["https://hooks.example.com/x", "http://a b", "ftp://x", "", "https://x\n"]),
    "contact_emails": st.sampled_from(["ops@example.com", "Ann Lee <ann@example.com>; b@c.d", "nope", "a@b;;c@d",
                                       "<>", "Ann <a@b", ";".join(["x@y.z"] * 21), ""]),
}


@st.composite
def accounts_csv(draw: st.DrawFn) -> str:
    """A spreadsheet export: a header of some columns, rows of good and bad values, sometimes mangled."""
    columns = draw(st.one_of(
        st.permutations(list(accounts.COLUMNS)),
        st.lists(st.sampled_from([*accounts.COLUMNS, "Account_ID ", "\ufeffaccount_id", "plan", ""]),
                 min_size=1, max_size=8),
    ))
    row = st.tuples(*[st.one_of(CELLS.get(c.strip().lower().lstrip("\ufeff"), st.text(max_size=10)),
                                st.text(max_size=20).filter(lambda v: "\x00" not in v)) for c in columns]).map(list)
    # most rows have a cell per column; some one too few or too many
    rows = draw(st.lists(st.one_of(row, row, row, row.map(lambda r: r[:-1]), row.map(lambda r: [*r, "extra"])),
                         max_size=8))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(rows)
    text = out.getvalue()
    if draw(st.integers(0, 3)) == 0:  # hand-edited: quotes, NULs, stray line breaks
        text = draw(fs.garbled(text.encode())).decode("utf-8", "replace")
    return text


@fuzz_settings(300)
@given(text=st.one_of(accounts_csv(), accounts_csv(), st.text(max_size=200)))
def test_parse_accounts_takes_any_file(text):
    case("accounts.parse_accounts")
    try:
        parsed = accounts.parse_accounts(io.StringIO(text, newline=""), source="accounts.csv")
    except UserError as exc:
        assert_readable(exc.message)
        assert exc.hint
        return
    good_lines = {line for line, _ in parsed.accounts}
    for line, account in parsed.accounts:
        assert line >= 2
        assert_round_trips(account)
        assert account.channel != "webhook" or account.webhook_url
        assert account.channel != "email" or account.contacts
    assert len({a.account_id for _, a in parsed.accounts}) == len(parsed.accounts)
    for problem in parsed.problems:
        assert problem.line >= 2 and problem.line not in good_lines
        assert problem.column in (*accounts.COLUMNS, "")
        assert_readable(problem.problem)
        assert str(problem).startswith(f"line {problem.line}: ")


@fuzz_settings(300)
@given(values=st.fixed_dictionaries({}, optional={
    column: st.one_of(cell, st.text(max_size=40), fs.huge_strings) for column, cell in CELLS.items()
}))
def test_check_row_takes_any_values(values):
    case("accounts.check_row")
    account, problems = accounts.check_row(values, 7)
    assert (account is None) == bool(problems)
    if account is not None:
        assert_round_trips(account)
    for problem in problems:
        assert problem.line == 7 and problem.column in accounts.COLUMNS
        assert_readable(problem.problem)


# --- what the sink and the worker do with a raw Kafka record ----------------------------------

TOPIC_RECORDS: dict[str, Any] = {
    "client-spans": fs.RECORDS[Span], "server-spans": fs.RECORDS[Span],
    "requests": fs.RECORDS[CorrelatedRequest], "fault-reports": fs.RECORDS[FaultReport],
    "reports-diagnosed": fs.RECORDS[DiagnosedReport], "behaviour": fs.RECORDS[BehaviourEvent],
    "surges": fs.RECORDS[SurgeEvent], "incidents": fs.RECORDS[IncidentEvent],
    "notifications": fs.RECORDS[Notification], "deliveries": fs.RECORDS[DeliveryAttempt],
    "changes": fs.RECORDS[Change], "misuse-detections": fs.RECORDS[MisuseDetection],
}
assert set(TOPIC_RECORDS) | {"dlq"} == set(MAPPINGS), "a topic the sink reads has no fuzz input"
HEADER_NAMES = ["reason", "source_topic", "source_partition", "source_offset", "other"]


@fuzz_settings(500)
@given(topic=st.sampled_from(sorted(TOPIC_RECORDS)), data=st.data())
def test_the_sink_turns_any_record_into_a_row_or_a_dead_letter_reason(topic, data):
    case("clickhouse_rows.to_row")
    valid = TOPIC_RECORDS[topic]
    value = data.draw(st.one_of(fs.json_bytes_for(fs.plain(valid)), st.none()), label="value")
    mapping = MAPPINGS[topic]
    try:
        row = to_row(topic, value, RecordMeta(0, 0, 0), MAX_BYTES)
        landing = to_landing_json(topic, value, MAX_BYTES) if mapping.landing else None
    except InvalidRecord as exc:
        assert_readable(exc.reason)
        return
    assert len(row) == len(mapping.columns)
    if landing is not None:
        assert landing == contracts.encode(contracts.decode(landing, type(valid)))


@fuzz_settings(300)
@given(value=st.one_of(st.binary(max_size=256), st.none()), key=st.one_of(st.binary(max_size=32), st.none()),
       headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.one_of(
           st.binary(max_size=16), st.integers(-5, 10**20).map(lambda n: str(n).encode()))), max_size=6))
def test_the_sink_stores_any_dead_letter_or_says_why_not(value, key, headers):
    case("clickhouse_rows.to_row")
    try:
        row = to_row("dlq", value, RecordMeta(1, 2, 3, key, headers), MAX_BYTES)
    except InvalidRecord as exc:
        assert_readable(exc.reason)
        return
    assert len(row) == len(MAPPINGS["dlq"].columns)


@fuzz_settings(300)
@given(reason=st.one_of(st.text(), st.sampled_from(fs.ODD_STRINGS),
                        st.tuples(st.text(max_size=3), fs.huge_strings).map("".join)),
       topic=st.text(string.printable, min_size=1, max_size=60), partition=st.integers(0, 2**31 - 1),
       offset=st.integers(0, 2**63 - 1))
def test_dead_letter_headers_carry_a_reason_any_consumer_can_read(reason, topic, partition, offset):
    case("dead_letters.dead_letter_headers")
    headers = dead_letter_headers(reason, topic, partition, offset)
    shown = headers["reason"].decode("utf-8")  # strict: a cut inside a character would fail here
    assert len(headers["reason"]) <= MAX_REASON_BYTES
    assert reason.startswith(shown) and (shown or not reason)
    assert (headers["source_topic"].decode(), int(headers["source_partition"]), int(headers["source_offset"])) \
        == (topic, partition, offset)


# --- the real worker on Kafka ----------------------------------------------------------------

# What the worker reads, and the decoder that decides whether a record is taken or dead-lettered.
WORKER_INPUTS: dict[str, tuple[Any, Any]] = {
    "client-spans": (fs.plain(fs.SPAN), decode_spans),
    "server-spans": (fs.plain(fs.SPAN) | {"side": "server"}, decode_spans),
    "fault-reports": (fs.plain(fs.RECORDS[FaultReport]), lambda v: contracts.decode(v, FaultReport)),
    "reports-by-request": (fs.plain(fs.RECORDS[FaultReport]), lambda v: contracts.decode(v, FaultReport)),
    "incident-signals": (fs.plain(fs.SIGNALS[0]) | {"kind": "count"}, contracts.decode_signal),
}
KAFKA_RECORD_LIMIT = 200_000  # well under the broker's message size limit
# (key, value) of records that once crashed an agent of the worker, sent to each topic first:
# a tombstone without a key, bytes that are not UTF-8 in a key, nesting deeper than the stack.
CRASHERS = [(None, None), (b"k", b'{"\x80": 1}'), (b"k", b'{"a":' * 5000 + b"1" + b"}" * 5000)]
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5"}


def rejected_by_worker(topic: str, value: bytes | None) -> bool:
    """Dead-lettered whole, or (a batch of spans) a span of it at least."""
    if value is not None and len(value) > KAFKA_RECORD_LIMIT:
        return False
    try:
        decoded = WORKER_INPUTS[topic][1](value or b"")
    except InvalidRecord:
        return True
    return bool(getattr(decoded, "rejected", False))


def worker_dead_letters(topic: str, partition: int, offset: int, value: bytes | None, partitions: int
                        ) -> dict[tuple[str, int, int, int | None], bytes | None]:
    """The dead letters the worker owes for one malformed record, by origin and batch position
    (None: the record whole), with the value each carries: the record, or the bad span alone —
    which is also the case of a good span in a batch of another partition."""
    logical = topic.split(".", 1)[1]
    try:
        decoded = WORKER_INPUTS[logical][1](value or b"")
    except InvalidRecord:
        return {(topic, partition, offset, None): value}
    owed = {(topic, partition, offset, position): raw
            for (position, _), raw in zip(decoded.rejected, decoded.rejected_values)}
    for position, span in decoded.positions():
        if partition_of(span.request_id.encode(), partitions) != partition:
            owed[(topic, partition, offset, position)] = contracts.encode(span)
    return owed


def _batch_of(shape: Any) -> st.SearchStrategy[bytes]:
    """A batch record: valid spans and a mutated one or more, each item still JSON."""
    item = st.one_of(st.just(fs.to_json(shape)), fs.mutations_of(shape, max_steps=1).map(fs.to_json))
    return st.lists(item.filter(_is_json), min_size=1, max_size=6).map(lambda items: b"[" + b",".join(items) + b"]")


def _is_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except (msgspec.DecodeError, *contracts.UNREADABLE):
        return False
    return True


def _malformed_value(topic: str) -> st.SearchStrategy[bytes]:
    bad = fs.json_bytes_for(WORKER_INPUTS[topic][0])
    return st.one_of(bad, _batch_of(WORKER_INPUTS[topic][0])) if topic.endswith("-spans") else bad


malformed_worker_records = st.sampled_from(sorted(WORKER_INPUTS)).flatmap(lambda topic: st.tuples(
    st.just(topic),
    st.one_of(st.none(), st.binary(max_size=24)),
    st.one_of(st.none(), _malformed_value(topic)).filter(
        lambda value, topic=topic: rejected_by_worker(topic, value)),
))


def generated(strategy: st.SearchStrategy[Any], count: int, target: str) -> list[Any]:
    """``count`` examples of ``strategy`` drawn by hypothesis (one run, no shrinking), each counted."""
    drawn: list[Any] = []

    @fuzz_settings(count, phases=[Phase.generate], database=None, deadline=None)
    @given(strategy)
    def collect(example: Any) -> None:
        case(target)
        drawn.append(example)

    collect()
    return drawn


def valid_worker_records(run: str) -> list[tuple[str, bytes, bytes]]:
    """Two requests seen from both sides and a fault report on the first: what must still come out."""
    out = []
    for n in (1, 2):
        request_id = f"{run}-req-{n}"
        for side in ("client", "server"):
            span = msgspec.structs.replace(fs.SPAN, request_id=request_id, side=side, start_us=fs.T0 + n,
                                           client_ip="203.0.113.7" if side == "client" else "")
            out.append((f"{side}-spans", request_id.encode(), contracts.encode(span)))
    report = msgspec.structs.replace(fs.RECORDS[FaultReport], report_id=f"{run}-report", request_ids=[f"{run}-req-1"],
                                     client_log=[])
    out.append(("fault-reports", report.report_id.encode(), contracts.encode(report)))
    return out


@pytest.mark.kafka
def test_the_worker_dead_letters_every_malformed_record_with_its_reason_and_goes_on(settings: Settings, tmp_path):
    malformed = generated(malformed_worker_records, 300, "worker on Kafka")
    assert len(malformed) >= 200
    crashers = [(topic, key, value) for topic in WORKER_INPUTS for key, value in CRASHERS]
    assert all(rejected_by_worker(topic, value) for topic, _, value in crashers)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    sent: dict[tuple[str, int, int, int | None], bytes | None] = {}

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        sent.update(worker_dead_letters(message.topic(), message.partition(), message.offset(), message.value(),
                                        settings.partitions))

    try:
        producer = Producer(settings.producer_config())
        for topic, key, value in crashers + malformed:
            producer.produce(settings.topic(topic), key=key, value=value, on_delivery=delivered)
        assert producer.flush(60) == 0
        valid = valid_worker_records(settings.topic_prefix.rstrip("."))
        for topic, key, value in valid:  # after the malformed ones: the worker must get past them
            producer.produce(settings.topic(topic), key=key, value=value)
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 120
        while True:
            dead = {(h["source_topic"].decode(), int(h["source_partition"]), int(h["source_offset"]),
                     int(h["source_position"]) if "source_position" in h else None): (m, h)
                    for m in read_range(settings, [settings.topic("dlq")]) for h in [dict(m.headers() or ())]}
            requests = {m.key().decode() for m in read_range(settings, [settings.topic("requests")])}
            diagnosed = {m.key().decode() for m in read_range(settings, [settings.topic("reports-diagnosed")])}
            wanted_requests = {key.decode() for topic, key, _ in valid if topic.endswith("spans")}
            if set(sent) <= set(dead) and wanted_requests <= requests and f"{valid[-1][1].decode()}" in diagnosed:
                break
            assert worker.proc.poll() is None, worker.tail()
            assert time.monotonic() < deadline, (
                f"{len(set(sent) - set(dead))} of {len(sent)} malformed records not dead-lettered "
                f"({[(o, sent[o]) for o in sorted(set(sent) - set(dead))][:10]}); requests "
                f"{sorted(requests & wanted_requests)}, diagnosed {sorted(diagnosed)}\n{worker.tail()}")
            time.sleep(0.5)
        assert worker.proc.poll() is None, worker.tail()
        assert b"Last crash reason" not in worker.log_path.read_bytes(), worker.tail()  # no agent restarted
    finally:
        worker.stop()
    for origin, value in sent.items():
        message, headers = dead[origin]
        # untouched, but for a tombstone without a key, which Faust can only send as b""
        assert message.value() == value or (value is None and message.key() is None and message.value() == b""), origin
        assert_readable(headers["reason"].decode("utf-8"))
    print(f"\nworker: {len(sent)} malformed records dead-lettered with their reason and origin, "
          f"{len(valid)} valid ones processed after them")
