"""The gateway's decisions as pure functions: consent, body decoding, the records to produce.

Nothing here does I/O. Handlers in :mod:`supportlens.gateway.app` read a request, call
these, and hand the resulting :class:`OutRecord` list to the producer. A problem the
client can fix raises :class:`RequestRejected` with the HTTP status and a message that
names the problem (and the field, where there is one).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from supportlens import contracts
from supportlens.contracts import BehaviourEvent, Change, FaultReport, InvalidRecord, Span
from supportlens.gateway.addresses import ClientAddressPolicy
from supportlens.otlp import RequestIdRule, attributes_dict, normalize_request
from supportlens.span_batches import pack_spans

CLIENT_SPANS, SERVER_SPANS, FAULT_REPORTS, BEHAVIOUR = "client-spans", "server-spans", "fault-reports", "behaviour"
CHANGES = "changes"
CONSENT_ATTRIBUTE = "supportlens.consent"
CONSENT_GRANTED = "granted"
ATTACHED_TO_REPORT = "attached_to_report"
# HTTP "deflate" is the zlib format (RFC 9110 §8.4.1.2); 16 + MAX_WBITS asks zlib for a gzip header.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_REASONS_SHOWN = 3

_json_decoder = msgspec.json.Decoder()


class RequestRejected(Exception):
    """A request the client has to change; ``status`` is the HTTP answer, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OutRecord(NamedTuple):
    """One record to produce; ``topic`` is the logical name (``client-spans``), not the prefixed one."""

    topic: str
    key: str
    value: bytes
    partition: int | None = None  # None: where the producer's partitioner (murmur2) puts ``key``


def too_large(limit: int, what: str = "request body") -> RequestRejected:
    return RequestRejected(413, f"{what} is larger than the limit of {limit:,} bytes")


# --- bodies ------------------------------------------------------------------------------


def decompress_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body as sent before compression, never more than ``limit`` bytes of it in memory.

    Raises :class:`RequestRejected`: 415 for an unsupported encoding, 400 for data that is
    not what the encoding says, 413 when it would inflate past ``limit`` (a zip bomb stops
    there, after at most ``limit + 1`` bytes were produced).
    """
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise RequestRejected(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestRejected(400, f"body is not valid {encoding} data ({exc})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise too_large(limit, f"{encoding}-decompressed request body")
    if not inflater.eof:
        raise RequestRejected(400, f"body is not valid {encoding} data (it ends too early)")
    if inflater.unused_data:
        raise RequestRejected(400, f"body has data after the end of its {encoding} stream")
    return data


def parse_json(body: bytes) -> Any:
    """Any JSON value; malformed JSON is a 400 that says where it broke."""
    try:
        return _json_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise RequestRejected(400, f"body is {contracts.explain(str(exc))}") from None
    except contracts.UNREADABLE as exc:
        raise RequestRejected(400, f"body is {contracts.why_unreadable(exc)}") from None


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    value = parse_json(body)
    if not isinstance(value, dict):
        raise RequestRejected(400, f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


# --- spans (OTLP) ------------------------------------------------------------------------


@dataclass
class SpanBatch:
    """What became of the spans of one export request."""

    spans: list[Span] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why spans were rejected, with their path
    rejected: int = 0  # spans that could not be read
    withheld: int = 0  # client spans of users who did not consent: not stored

    @property
    def refused(self) -> int:
        return self.rejected + self.withheld

    def message(self) -> str:
        """The first few reasons, for OTLP's ``partialSuccess.errorMessage``."""
        reasons = list(self.reasons)
        if self.withheld:
            reasons.insert(
                0,
                f"{self.withheld} client span(s) not stored: resource attribute "
                f"{CONSENT_ATTRIBUTE} is not \"{CONSENT_GRANTED}\"",
            )
        shown = "; ".join(reasons[:_REASONS_SHOWN])
        more = len(reasons) - _REASONS_SHOWN
        return f"{shown}; and {more} more" if more > 0 else shown


def accept_spans(
    payload: Mapping[str, Any], rule: RequestIdRule, client_ip: str, policy: ClientAddressPolicy,
    max_bytes: int = 1_048_576,
) -> SpanBatch:
    """Normalize an OTLP/JSON ``ExportTraceServiceRequest`` from a caller at ``client_ip``.

    Resources that declare ``supportlens.side=server`` are backend services and need no
    consent; every other resource is a client app whose spans are kept only when its
    resource attribute ``supportlens.consent`` is ``"granted"`` (the rest are counted as
    withheld). Client spans get the caller's address (anonymized when configured);
    server spans carry none. A span whose record would be over ``max_bytes`` is rejected:
    normalizing can make it larger than it was in the request (nested attribute values
    become JSON text). Raises :class:`RequestRejected` (400) when ``resourceSpans`` is not
    a list or a span is not shaped like OTLP at all.
    """
    batch = SpanBatch()
    screened = _screen_resources(payload, batch)
    if not screened:
        return batch
    normalized = normalize_request({"resourceSpans": screened}, rule, "client", client_ip)
    batch.reasons.extend(normalized.rejected)
    batch.rejected += len(normalized.rejected)
    for span in normalized.spans:
        if span.side == "client":
            span = msgspec.structs.replace(span, client_ip=policy.scrub(span.client_ip))
        size = len(contracts.encode(span))
        if size > max_bytes:
            batch.reasons.append(f"span of request {span.request_id!r} is {size:,} bytes once normalized, "
                                 f"over the limit of {max_bytes:,} bytes")
            batch.rejected += 1
            continue
        batch.spans.append(span)
    return batch


def _screen_resources(payload: Mapping[str, Any], batch: SpanBatch) -> list[Any]:
    """``resourceSpans`` with unconsented and unreadable resources replaced by empty stand-ins.

    The stand-ins keep every other resource at its index, so the normalizer's rejection
    paths (``resourceSpans[2]…``) still point into the request the client sent.
    """
    resource_spans = payload.get("resourceSpans")
    if resource_spans is None:
        return []  # an empty export request is valid OTLP
    if not isinstance(resource_spans, list):
        raise RequestRejected(400, f"`resourceSpans` must be a list, got {_json_type(resource_spans)}")
    screened: list[Any] = []
    for index, resource_span in enumerate(resource_spans):
        if isinstance(resource_span, Mapping):
            try:
                attributes = _resource_attributes(resource_span)
            except ValueError as exc:
                batch.reasons.append(f"resourceSpans[{index}]: {exc}")
                batch.rejected += _span_count(resource_span)
                resource_span = {}
            else:
                if not _may_store(attributes):
                    batch.withheld += _span_count(resource_span)
                    resource_span = {}
        screened.append(resource_span)
    return screened


def _resource_attributes(resource_span: Mapping[str, Any]) -> dict[str, Any]:
    """The resource's attributes; raises ``ValueError`` when the resource or its scopes are not shaped like OTLP."""
    resource = resource_span.get("resource") or {}
    if not isinstance(resource, Mapping):
        raise ValueError("`resource` is not an object")
    items = resource.get("attributes") or []
    if not isinstance(items, list) or not all(isinstance(kv, Mapping) for kv in items):
        raise ValueError("`resource.attributes` is not a list of key-value objects")
    scopes = resource_span.get("scopeSpans") or []
    if not isinstance(scopes, list) or not all(isinstance(scope, Mapping) for scope in scopes if scope):
        raise ValueError("`scopeSpans` is not a list of objects")
    try:
        return attributes_dict(items)
    except ValueError as exc:  # ours, in words
        raise ValueError(f"`resource.attributes`: {exc}") from None
    except (TypeError, AttributeError, KeyError):  # Python's words ("'str' object has no attribute 'get'")
        raise ValueError("`resource.attributes`: a field that must be an object or list is not") from None


def _may_store(resource: Mapping[str, Any]) -> bool:
    return resource.get("supportlens.side") == "server" or resource.get(CONSENT_ATTRIBUTE) == CONSENT_GRANTED


def _span_count(resource_span: Mapping[str, Any]) -> int:
    scopes = resource_span.get("scopeSpans")
    if not isinstance(scopes, list):
        return 1
    return sum(_spans_in(scope.get("spans")) if isinstance(scope, Mapping) else 1 for scope in scopes)


def _spans_in(spans: Any) -> int:
    """How many spans a scope holds for the count of withheld spans: a value that is no list (a
    broken export) counts as one, to be refused or withheld with the rest, never a crash."""
    return len(spans) if isinstance(spans, list) else int(bool(spans))


def span_records(spans: Sequence[Span], partitions: int, max_bytes: int) -> list[OutRecord]:
    """Client spans to ``client-spans``, server spans to ``server-spans``: one batch record per
    topic and destination partition of ``partitions`` (the worker pays per record, not per span),
    each within the readers' ``max_bytes``.

    Each record names its partition, where murmur2 puts every request id in it, and is keyed
    by its first span's request id, so it is where a key-partitioning producer would put it too.
    """
    sides = ((CLIENT_SPANS if span.side == "client" else SERVER_SPANS, span) for span in spans)
    packed = pack_spans(sides, partitions, max_bytes)
    return [OutRecord(topic, batch.key, batch.value, batch.partition) for topic, batch in packed]


# --- fault reports -----------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedReport:
    report: FaultReport
    attached_spans: list[Span]  # its client_log, each marked with the report it came with

    def records(self, partitions: int, max_bytes: int) -> list[OutRecord]:
        """The report on ``fault-reports``; its attached spans on ``client-spans``, in batch
        records as :func:`span_records` makes them."""
        return [
            OutRecord(FAULT_REPORTS, self.report.report_id, contracts.encode(self.report)),
            *span_records(self.attached_spans, partitions, max_bytes),
        ]


def accept_fault_report(
    body: bytes,
    *,
    received_at_us: int,
    client_ip: str,
    new_report_id: Callable[[], str],
    policy: ClientAddressPolicy,
    max_bytes: int,
    first_receipt: Callable[[str, int, str], tuple[int, str]] | None = None,
) -> AcceptedReport:
    """Validate a one-click report; the gateway's own view replaces what the client claimed.

    ``received_at_us`` and ``client_ip`` always come from the gateway; ``report_id`` is
    the client's when it sent one (so a retried report keeps its id), else a new one. For an
    id the client chose, ``first_receipt(report_id, received_at_us, client_ip)`` may give the
    receipt of an earlier attempt, so a retry is the same record
    (:class:`~supportlens.gateway.receipts.ReportReceipts`).
    The spans of ``client_log`` were attached by the user's explicit action, so they are
    stored whatever the tracing consent: as client spans (whatever side they claim),
    addresses anonymized when configured, attribute ``attached_to_report`` = the report id.
    Raises :class:`RequestRejected`: 400 whose message names the offending field, 413 when the
    report or an attached span as stored would be over ``max_bytes``.
    """
    raw = parse_json_object(body, "a fault report")
    raw["received_at_us"] = received_at_us
    raw["client_ip"] = client_ip
    client_chose_id = raw.get("report_id") not in (None, "")
    if not client_chose_id:
        raw["report_id"] = new_report_id()
    report = _validated(raw, FaultReport, max_bytes)
    if client_chose_id and first_receipt is not None:
        received_at_us, client_ip = first_receipt(report.report_id, received_at_us, client_ip)
        report = msgspec.structs.replace(report, received_at_us=received_at_us, client_ip=client_ip)
    own_log = [
        msgspec.structs.replace(span, side="client", client_ip=policy.scrub(span.client_ip))
        for span in report.client_log
    ]
    attached = []
    for index, span in enumerate(own_log):
        marked = msgspec.structs.replace(span, attributes={**span.attributes, ATTACHED_TO_REPORT: report.report_id})
        # re-validated: the added attribute must not push the span past the contract's limits
        attached.append(_validated(msgspec.to_builtins(marked), Span, max_bytes, where=f"client_log[{index}]: "))
    return AcceptedReport(msgspec.structs.replace(report, client_log=own_log), attached)


# --- behaviour ---------------------------------------------------------------------------


def consented(header: str | None) -> bool:
    """Behaviour consent travels as ``X-Supportlens-Consent: granted``; anything else is no consent."""
    return (header or "").strip().lower() == CONSENT_GRANTED


def decode_behaviour(body: bytes, max_bytes: int) -> list[BehaviourEvent]:
    """One event object or an array of them; the first invalid one rejects the request
    (400; 413 when one as stored would be over ``max_bytes``)."""
    value = parse_json(body)
    if isinstance(value, dict):
        return [_validated(value, BehaviourEvent, max_bytes)]
    if not isinstance(value, list):
        raise RequestRejected(400, f"behaviour must be an event object or an array of them, got {_json_type(value)}")
    return [_validated(item, BehaviourEvent, max_bytes, where=f"events[{i}]: ") for i, item in enumerate(value)]


def behaviour_records(events: Sequence[BehaviourEvent]) -> list[OutRecord]:
    return [OutRecord(BEHAVIOUR, event.user_id, contracts.encode(event)) for event in events]


# --- changes -----------------------------------------------------------------------------


def decode_changes(body: bytes, max_bytes: int, received_at_us: int) -> list[Change]:
    """One change object or an array of them, as a CI/CD pipeline posts them; a change without
    ``started_at_us`` started when the gateway received it (``received_at_us``). The first
    invalid one rejects the request (400 naming the field, ``changes[2]: …`` in an array; 413
    when one as stored would be over ``max_bytes``). The service is not checked against the
    catalogue: a new service deploys before the catalogue knows it, and its change is kept."""
    value = parse_json(body)
    if isinstance(value, dict):
        return [_change(value, max_bytes, received_at_us)]
    if not isinstance(value, list) or not value:
        got = "an empty array" if isinstance(value, list) else _json_type(value)
        raise RequestRejected(400, f"changes must be a change object or an array of them, got {got}")
    return [_change(item, max_bytes, received_at_us, where=f"changes[{i}]: ") for i, item in enumerate(value)]


def _change(raw: Any, max_bytes: int, received_at_us: int, where: str = "") -> Change:
    if isinstance(raw, dict) and raw.get("started_at_us") is None:
        raw["started_at_us"] = received_at_us
    return _validated(raw, Change, max_bytes, where)


def change_records(changes: Sequence[Change]) -> list[OutRecord]:
    """Each change on ``changes``, keyed by its id: the compacted topic keeps the latest post of each."""
    return [OutRecord(CHANGES, change.change_id, contracts.encode(change)) for change in changes]


def _validated(raw: Any, record_type: type[contracts.R], max_bytes: int, where: str = "") -> contracts.R:
    """``raw`` through the contract's strict decoder, so unknown fields land in ``attributes``.

    413 when the record as stored would be over ``max_bytes``: an unknown field's value
    becomes JSON text in ``attributes``, which can make the record larger than the request.
    """
    kind = contracts.KIND_NAMES[record_type]
    if not isinstance(raw, dict):
        raise RequestRejected(400, f"{where}invalid {kind}: expected a JSON object")
    try:
        record = contracts.decode(msgspec.json.encode(raw), record_type, max_bytes)
    except InvalidRecord as exc:
        raise RequestRejected(400, f"{where}{exc}") from None
    if len(contracts.encode(record)) > max_bytes:
        raise too_large(max_bytes, f"{where}{kind} as stored")
    return record
