"""Fold what a run put on Kafka into a summary, and compare it with the run's ground truth.

Pure: it takes decoded-or-not messages as (topic, value) pairs and returns counts; the
caller reads Kafka and prints. Records that fail validation are counted with their
reason, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from supportlens.contracts import Account, BehaviourEvent, FaultReport, InvalidRecord, Span, decode
from supportlens.simulator.labels import RunLabel

RECORD_TYPES: dict[str, type] = {
    "client-spans": Span,
    "server-spans": Span,
    "fault-reports": FaultReport,
    "behaviour": BehaviourEvent,
    "accounts": Account,
}


@dataclass
class Observed:
    """What was read back from Kafka for one run."""

    records: Counter[str] = field(default_factory=Counter)  # per logical topic
    invalid: Counter[str] = field(default_factory=Counter)  # reason → count
    request_ids: set[str] = field(default_factory=set)
    failed_requests: set[str] = field(default_factory=set)
    server_errors_by_service: Counter[str] = field(default_factory=Counter)
    client_errors_by_code: Counter[str] = field(default_factory=Counter)
    reports_by_region: Counter[str] = field(default_factory=Counter)
    reports_by_code: Counter[str] = field(default_factory=Counter)
    reporting_users: set[str] = field(default_factory=set)


def observe(messages: Iterable[tuple[str, bytes | None]], max_bytes: int = 1_048_576) -> Observed:
    """Summarize ``(logical topic, value)`` pairs."""
    seen = Observed()
    for topic, value in messages:
        record_type = RECORD_TYPES.get(topic)
        if record_type is None:
            continue
        try:
            record = decode(value or b"", record_type, max_bytes)
        except InvalidRecord as exc:
            seen.invalid[f"{topic}: {exc.reason}"] += 1
            continue
        seen.records[topic] += 1
        if isinstance(record, Span):
            seen.request_ids.add(record.request_id)
            if record.status == "error" or (record.http_status or 0) >= 400:
                seen.failed_requests.add(record.request_id)
            if record.side == "server" and record.status == "error" and record.http_status == 503:
                seen.server_errors_by_service[record.service] += 1
            if record.side == "client" and record.status == "error":
                seen.client_errors_by_code[record.error_code or "-"] += 1
        elif isinstance(record, FaultReport):
            seen.reports_by_region[record.region or "-"] += 1
            seen.reports_by_code[record.error_code or "-"] += 1
            seen.reporting_users.add(record.user_id)
    return seen


@dataclass(frozen=True)
class Comparison:
    topic: str
    expected: int
    seen: int

    @property
    def ok(self) -> bool:
        return self.expected == self.seen


def compare(run: RunLabel, seen: Observed) -> list[Comparison]:
    """Per topic: records the simulator sent (ground truth) against records read back."""
    rows = [Comparison(topic, run.counts.get(topic, 0), seen.records.get(topic, 0)) for topic in RECORD_TYPES]
    rows.append(Comparison("requests with a span", run.visible_requests, len(seen.request_ids)))
    return rows
