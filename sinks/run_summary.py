"""Fold what a run put on Kafka into a summary, and compare it with the run's ground truth.

Pure: it takes decoded-or-not messages as (topic, value) pairs and returns counts; the
caller reads Kafka and prints. Records that fail validation are counted with their
reason, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from supportlens.contracts import (
    Account,
    BehaviourEvent,
    CorrelatedRequest,
    DiagnosedReport,
    FaultReport,
    InvalidRecord,
    Span,
    decode,
)
from supportlens.simulator.labels import Label, ReportLabel, RequestLabel, RunLabel
from supportlens.span_batches import decode_spans, rejected_reason

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

    records: Counter[str] = field(default_factory=Counter)  # per logical topic; spans on a span topic
    invalid: Counter[str] = field(default_factory=Counter)  # reason → count
    request_ids: set[str] = field(default_factory=set)
    server_errors_by_service: Counter[str] = field(default_factory=Counter)  # spans answering 503
    reporting_users: set[str] = field(default_factory=set)


def observe(messages: Iterable[tuple[str, bytes | None]], max_bytes: int = 1_048_576) -> Observed:
    """Summarize ``(logical topic, value)`` pairs.

    A span topic is counted in spans, not records: a record may carry a batch of them, and
    the simulator's ground truth counts spans. A bad span of a batch is counted as invalid
    with its position; its neighbours are counted as read.
    """
    seen = Observed()
    for topic, value in messages:
        record_type = RECORD_TYPES.get(topic)
        if record_type is None:
            continue
        try:
            if record_type is Span:
                spans = decode_spans(value or b"", max_bytes)
            else:
                record = decode(value or b"", record_type, max_bytes)
        except InvalidRecord as exc:
            seen.invalid[f"{topic}: {exc.reason}"] += 1
            continue
        if record_type is not Span:
            seen.records[topic] += 1
            if isinstance(record, FaultReport):
                seen.reporting_users.add(record.user_id)
            continue
        for position, reason in spans.rejected:
            seen.invalid[f"{topic}: {rejected_reason(position, reason)}"] += 1
        seen.records[topic] += len(spans.spans)
        for span in spans.spans:
            seen.request_ids.add(span.request_id)
            if span.side == "server" and span.status == "error" and span.http_status == 503:
                seen.server_errors_by_service[span.service] += 1
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
    """Per topic: records the simulator sent (ground truth) against records read back (spans, on span topics)."""
    rows = [Comparison(topic, run.counts.get(topic, 0), seen.records.get(topic, 0)) for topic in RECORD_TYPES]
    rows.append(Comparison("requests with a span", run.visible_requests, len(seen.request_ids)))
    return rows


CLIENT_SIDE_CLASSES = frozenset({"network_slow", "client_crash", "network_unreachable"})


@dataclass
class Score:
    """The pipeline's output for one run against its ground truth."""

    expected_requests: set[str]
    correlated: dict[str, CorrelatedRequest]  # latest version per request id
    expected_reports: set[str]
    diagnosed: dict[str, DiagnosedReport]
    requests: Counter[tuple[str, str]]  # (expected class, diagnosed class)
    reports: Counter[tuple[str, str]]
    unobservable: int  # requests whose class only a client span could show, and none was seen
    unexpected: int  # correlated request ids this run never sent (another run's, or a bug)

    @property
    def requests_complete(self) -> bool:
        return set(self.correlated) == self.expected_requests

    @property
    def reports_complete(self) -> bool:
        return set(self.diagnosed) == self.expected_reports


def observable_requests(labels: Iterable[Label]) -> dict[str, RequestLabel]:
    """Requests the pipeline can know of: those with a span on a span topic, and those a fault
    report names first (the user attached their client span to it)."""
    labels = list(labels)
    requests = {l.request_id: l for l in labels if isinstance(l, RequestLabel)}
    named = {l.request_ids[0] for l in labels if isinstance(l, ReportLabel) and l.request_ids}
    return {rid: l for rid, l in requests.items() if l.server_spans or l.client_span_emitted or rid in named}


def newest_diagnoses(reports: Iterable[DiagnosedReport]) -> dict[str, DiagnosedReport]:
    """Each report's newest diagnosis (the latest ``diagnosed_at_us``), as ClickHouse keeps it."""
    newest: dict[str, DiagnosedReport] = {}
    for report in reports:
        known = newest.get(report.report_id)
        if known is None or known.diagnosed_at_us <= report.diagnosed_at_us:
            newest[report.report_id] = report
    return newest


def score(labels: Iterable[Label], requests: Iterable[CorrelatedRequest], reports: Iterable[DiagnosedReport]) -> Score:
    """Confusion of expected against diagnosed classes, for requests and for reports.

    Without a client span (no consent, no report) a slow network or a crash cannot be seen
    from the server side: such requests count as ``unobservable``, not as misses.
    """
    labels = list(labels)
    truth = observable_requests(labels)
    report_truth = {l.report_id: l for l in labels if isinstance(l, ReportLabel)}
    latest: dict[str, CorrelatedRequest] = {}
    unexpected: set[str] = set()
    for request in requests:
        if request.request_id not in truth:
            unexpected.add(request.request_id)
        elif request.request_id not in latest or latest[request.request_id].version < request.version:
            latest[request.request_id] = request
    # the newest diagnosis wins, as in ClickHouse: one traced to an earlier misuse replaces its symptom's
    diagnosed = {rid: r for rid, r in newest_diagnoses(reports).items() if rid in report_truth}
    request_confusion: Counter[tuple[str, str]] = Counter()
    unobservable = 0
    for rid, request in latest.items():
        label = truth[rid]
        if not request.has_client and label.expected_class in CLIENT_SIDE_CLASSES:
            unobservable += 1
            continue
        request_confusion[(label.expected_class, request.diagnosis.cls)] += 1
    report_confusion = Counter((report_truth[rid].expected_class, r.diagnosis.cls) for rid, r in diagnosed.items())
    return Score(set(truth), latest, set(report_truth), diagnosed,
                 request_confusion, report_confusion, unobservable, len(unexpected))


def accuracy_by_class(confusion: Counter[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """Per expected class: (diagnosed right, total)."""
    out: dict[str, tuple[int, int]] = {}
    for (expected, got), n in confusion.items():
        right, total = out.get(expected, (0, 0))
        out[expected] = (right + (n if got == expected else 0), total + n)
    return dict(sorted(out.items()))
