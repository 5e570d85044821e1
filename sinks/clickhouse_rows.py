"""Kafka records → typed ClickHouse rows (pure; no I/O).

Each logical topic maps to one table. :func:`to_row` decodes a record with the same
strict contracts the processors use and returns the row in the table's column order,
or raises :class:`~supportlens.contracts.InvalidRecord` naming the problem, so the
sink can dead-letter it. Times go in as raw DateTime64 ticks (µs, or ms for Kafka
timestamps), which skips a datetime conversion per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from supportlens.contracts import (
    AttributeValue,
    BehaviourEvent,
    Change,
    CorrelatedRequest,
    DeliveryAttempt,
    DiagnosedReport,
    FaultReport,
    IncidentEvent,
    InvalidRecord,
    MisuseDetection,
    Network,
    Notification,
    Span,
    SurgeEvent,
    decode,
    encode,
)
from supportlens.span_batches import decode_spans, rejected_reason

MAX_DEAD_LETTER_VALUE = 65_536  # bytes of a dead record's value kept in ClickHouse; the topic has it whole

_json_encoder = msgspec.json.Encoder()  # hops, suspects: JSON text columns
_NO_NETWORK = Network()


@dataclass(frozen=True)
class RecordMeta:
    """What Kafka says about a record besides its value."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()


@dataclass(frozen=True)
class TableMapping:
    table: str
    columns: tuple[str, ...]
    convert: Callable[[bytes, RecordMeta, int], list[Any]]
    # High-volume topics: the sink sends normalized JSON to this Null-engine table and a
    # materialized view maps it into ``table`` (migration 0009) — the same mapping as
    # ``convert``, done by ClickHouse instead of Python.
    landing: str | None = None
    record_type: type | None = None


def _attributes(values: dict[str, AttributeValue]) -> dict[str, str]:
    return {key: value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in values.items()}


def _span_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    # one span's record; the sink lands batches through spans_landing_json
    s = decode(value, Span, max_bytes)
    n = s.network or _NO_NETWORK
    return [
        s.request_id, s.side, s.span_id, s.service, s.start_us, s.trace_id, s.parent_span_id, s.operation,
        s.duration_us, s.status, s.http_status or 0, s.error_code, s.error_message, s.client_ip, s.user_id,
        s.account_id, s.app_version, s.platform, s.region, n.isp, n.asn, n.connection_type, _attributes(s.attributes),
    ]


SPANS = TableMapping("spans", (
    "request_id", "side", "span_id", "service", "start", "trace_id", "parent_span_id", "operation",
    "duration_us", "status", "http_status", "error_code", "error_message", "client_ip", "user_id",
    "account_id", "app_version", "platform", "region", "isp", "asn", "connection_type", "attributes",
), _span_row, landing="spans_landing", record_type=Span)


def _request_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    r = decode(value, CorrelatedRequest, max_bytes)
    n = r.network or _NO_NETWORK
    d = r.diagnosis
    return [
        r.request_id, r.version, r.start_us, r.trace_id, r.operation, r.user_id, r.account_id, r.client_ip,
        r.app_version, r.platform, r.region, n.isp, n.asn, n.connection_type, r.has_client, r.has_server,
        r.client_duration_us, r.client_status, r.client_http_status or 0, r.client_error_code,
        r.server_duration_us, r.server_status, r.server_http_status or 0, r.root_service, list(r.teams),
        _json_encoder.encode(r.hops).decode(), r.span_count, d.cls, d.service, d.team, d.code, d.evidence,
        d.catalog_version, r.completeness, r.drill,
    ]


REQUESTS = TableMapping("requests", (
    "request_id", "version", "start", "trace_id", "operation", "user_id", "account_id", "client_ip",
    "app_version", "platform", "region", "isp", "asn", "connection_type", "has_client", "has_server",
    "client_duration_us", "client_status", "client_http_status", "client_error_code",
    "server_duration_us", "server_status", "server_http_status", "root_service", "teams",
    "hops", "span_count", "diagnosis_class", "diagnosis_service", "diagnosis_team", "diagnosis_code",
    "diagnosis_evidence", "catalog_version", "completeness", "drill",
), _request_row, landing="requests_landing", record_type=CorrelatedRequest)


def _report_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    r = decode(value, FaultReport, max_bytes)
    n = r.network or _NO_NETWORK
    return [
        r.client_ip, r.received_at_us, r.report_id, r.user_id, r.account_id, r.locale, r.app_version,
        r.platform, r.region, n.isp, n.asn, n.connection_type, list(r.request_ids), r.error_code,
        r.user_message, len(r.client_log), _attributes(r.attributes),
    ]


FAULT_REPORTS = TableMapping("fault_reports", (
    "client_ip", "received_at", "report_id", "user_id", "account_id", "locale", "app_version",
    "platform", "region", "isp", "asn", "connection_type", "request_ids", "error_code",
    "user_message", "client_log_spans", "attributes",
), _report_row)


def _diagnosis_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    r = decode(value, DiagnosedReport, max_bytes)
    n = r.network or _NO_NETWORK
    d = r.diagnosis
    return [
        r.client_ip, r.received_at_us, r.report_id, r.diagnosed_at_us, r.user_id, r.account_id, r.locale,
        r.app_version, r.platform, r.region, n.isp, n.connection_type, list(r.request_ids),
        r.primary_request_id, d.cls, d.service, d.team, d.code, d.surfaced_as, d.misuse_detection_id,
        d.evidence, d.catalog_version, r.title, r.explanation, r.action, r.doc_url, r.drill,
    ]


REPORT_DIAGNOSES = TableMapping("report_diagnoses", (
    "client_ip", "received_at", "report_id", "diagnosed_at", "user_id", "account_id", "locale",
    "app_version", "platform", "region", "isp", "connection_type", "request_ids",
    "primary_request_id", "diagnosis_class", "diagnosis_service", "diagnosis_team", "diagnosis_code",
    "diagnosis_surfaced_as", "misuse_detection_id", "diagnosis_evidence", "catalog_version", "title",
    "explanation", "action", "doc_url", "drill",
), _diagnosis_row)


def _misuse_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    m = decode(value, MisuseDetection, max_bytes)
    return [m.account_id, m.user_id, m.detection_id, m.at_us, m.rule, m.code, m.request_id, m.earlier_request_id,
            m.session_id, m.evidence, m.detected_at_us, m.drill]


# schema_version is left out, as in every table: a row is already in the store's schema
MISUSE_DETECTIONS = TableMapping("misuse_detections", (
    "account_id", "user_id", "detection_id", "at", "rule", "code", "request_id", "earlier_request_id",
    "session_id", "evidence", "detected_at", "drill",
), _misuse_row)


def _behaviour_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    e = decode(value, BehaviourEvent, max_bytes)
    return [e.user_id, e.ts_us, e.event_id, e.account_id, e.name, e.screen, e.app_version, e.platform,
            e.region, _attributes(e.attributes)]


BEHAVIOUR = TableMapping("behaviour", (
    "user_id", "ts", "event_id", "account_id", "name", "screen", "app_version", "platform", "region",
    "attributes",
), _behaviour_row)


def _dead_letter_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    headers = {name: raw for name, raw in meta.headers}
    try:
        topic = headers["source_topic"].decode()
        partition = int(headers["source_partition"])
        offset = int(headers["source_offset"])
        position = int(headers.get("source_position", b"0"))  # 0: the whole record (migration 0010)
    except (KeyError, ValueError, UnicodeDecodeError):
        raise InvalidRecord(
            "dead letter", "headers `source_topic`, `source_partition` and `source_offset` are required"
        ) from None
    reason = headers.get("reason", b"").decode("utf-8", "replace")
    key = (meta.key or b"").decode("utf-8", "replace")
    return [topic, partition, offset, position, meta.timestamp_ms, reason, key,
            value[:MAX_DEAD_LETTER_VALUE].decode("utf-8", "replace")]


DEAD_LETTERS = TableMapping("dead_letters", (
    "source_topic", "source_partition", "source_offset", "source_position", "at", "reason", "key", "value",
), _dead_letter_row)


def _surge_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    e = decode(value, SurgeEvent, max_bytes)
    return [e.dimension, e.value, e.at_us, e.surge_id, e.phase, e.kind, e.started_at_us, e.score, e.rate_per_min,
            e.baseline_per_min, e.reports, e.failed_requests, e.affected_users, e.drill, _attributes(e.attributes)]


SURGES = TableMapping("surges", (
    "dimension", "value", "at", "surge_id", "phase", "kind", "started_at", "score", "rate_per_min",
    "baseline_per_min", "reports", "failed_requests", "affected_users", "drill", "attributes",
), _surge_row)


def _incident_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    e = decode(value, IncidentEvent, max_bytes)
    return [e.incident_id, e.sequence, e.transition, e.at_us, e.started_at_us, e.resolved_at_us, e.severity,
            e.title, e.reason, e.root_key, dict(e.dimensions), list(e.services), list(e.teams), e.affected_users,
            e.declared_by, _json_encoder.encode(e.suspects).decode(), e.drill, _attributes(e.attributes)]


INCIDENTS = TableMapping("incidents", (
    "incident_id", "sequence", "transition", "at", "started_at", "resolved_at", "severity", "title", "reason",
    "root_key", "dimensions", "services", "teams", "affected_users", "declared_by", "suspects", "drill",
    "attributes",
), _incident_row)


def _change_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    c = decode(value, Change, max_bytes)
    return [c.change_id, c.kind, c.service, c.version, c.from_version, c.region, c.platform, c.started_at_us,
            c.finished_at_us, c.author, c.link, c.description, c.drill, _attributes(c.attributes)]


CHANGES = TableMapping("changes", (
    "change_id", "kind", "service", "version", "from_version", "region", "platform", "started_at", "finished_at",
    "author", "link", "description", "drill", "attributes",
), _change_row)


def _notification_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    n = decode(value, Notification, max_bytes)
    return [n.account_id, n.notification_id, n.created_at_us, n.kind, n.incident_id, n.channel, n.locale,
            n.subject, n.body, n.drill, _attributes(n.attributes)]


NOTIFICATIONS = TableMapping("notifications", (
    "account_id", "notification_id", "created_at", "kind", "incident_id", "channel", "locale", "subject",
    "body", "drill", "attributes",
), _notification_row)


def _delivery_row(value: bytes, meta: RecordMeta, max_bytes: int) -> list[Any]:
    d = decode(value, DeliveryAttempt, max_bytes)
    return [d.notification_id, d.attempt, d.account_id, d.at_us, d.channel, d.outcome, d.detail, d.drill]


DELIVERIES = TableMapping("notification_deliveries", (
    "notification_id", "attempt", "account_id", "at", "channel", "outcome", "detail", "drill",
), _delivery_row)


# Logical topic → table. The sink reads exactly these topics.
MAPPINGS: dict[str, TableMapping] = {
    "client-spans": SPANS,
    "server-spans": SPANS,
    "requests": REQUESTS,
    "fault-reports": FAULT_REPORTS,
    "reports-diagnosed": REPORT_DIAGNOSES,
    "behaviour": BEHAVIOUR,
    "dlq": DEAD_LETTERS,
    "surges": SURGES,
    "incidents": INCIDENTS,
    "changes": CHANGES,
    "notifications": NOTIFICATIONS,
    "deliveries": DELIVERIES,
    "misuse-detections": MISUSE_DETECTIONS,
}


def to_row(topic: str, value: bytes | None, meta: RecordMeta, max_bytes: int) -> list[Any]:
    """The row for one record of logical ``topic``; raises InvalidRecord when it cannot be stored."""
    if value is None:
        raise InvalidRecord("record", "the record has no value (a tombstone is not an event)")
    return MAPPINGS[topic].convert(value, meta, max_bytes)


def to_landing_json(topic: str, value: bytes | None, max_bytes: int) -> bytes:
    """The record validated and re-encoded for its landing table (a topic with ``landing``).

    Re-encoding normalizes it: fields a newer producer added are inside ``attributes``,
    as :func:`~supportlens.contracts.decode` put them, and no line break survives.
    Raises InvalidRecord like :func:`to_row`.
    """
    if value is None:
        raise InvalidRecord("record", "the record has no value (a tombstone is not an event)")
    mapping = MAPPINGS[topic]
    assert mapping.record_type is not None, f"{topic} has no landing table"
    return encode(decode(value, mapping.record_type, max_bytes))


class LandingSpans(NamedTuple):
    """One span record as landing lines: its good spans, and the bad ones of a batch."""

    lines: bytes  # JSON lines, one per good span ("" when none is good)
    count: int
    rejected: list[tuple[int, str, bytes]]  # (position in the batch, reason naming it, the span's own bytes)


def spans_landing_json(value: bytes | None, max_bytes: int) -> LandingSpans:
    """A span topic's record (one span or a batch, ``supportlens.span_batches``) as landing lines.

    A bad span inside a batch is returned in ``rejected`` with its position for its own dead
    letter; its neighbours are stored. Raises InvalidRecord when the record as a whole
    cannot be read, like :func:`to_landing_json`.
    """
    if value is None:
        raise InvalidRecord("record", "the record has no value (a tombstone is not an event)")
    record = decode_spans(value, max_bytes)
    rejected = [(position, rejected_reason(position, reason), bad)
                for (position, reason), bad in zip(record.rejected, record.rejected_values)]
    return LandingSpans(b"\n".join(encode(span) for span in record.spans), len(record.spans), rejected)
