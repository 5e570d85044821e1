"""Drills: replay the recorded traffic of a past incident through the pipeline, as an exercise.

The spans and fault reports of the incident's window (from ``lead`` before its start to
``tail`` after its end) are read back from ClickHouse, moved in time so the window starts
now, given new ids so no drill record ever replaces a real row, marked with the attribute
``supportlens.drill = true``, and produced to ``client-spans``, ``server-spans`` and
``fault-reports`` in event-time order, the spans of each recorded second in batch records
per partition as the gateway and the simulator write them. The pipeline sees the same traffic as then and
decides again; whatever it declares is a drill (DESIGN.md §5).

Event times keep the incident's pace, because surge detection counts in event time;
``speed`` compresses only the wall-clock time of the replay (simulated seconds per wall
second, like ``simulate --speed``; 0 = as fast as possible).

The transform (:class:`Drill`, :func:`drill_span`, :func:`drill_report`) is pure;
:func:`run_drill` does the I/O.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import msgspec
from clickhouse_connect.driver.exceptions import ClickHouseError

from supportlens.bulk_producer import BulkProducer
from supportlens.config import Settings
from supportlens.contracts import FaultReport, InvalidRecord, Span, decode, encode
from supportlens.errors import UserError
from supportlens.span_batches import pack_spans
from supportlens.store.recorded import ATTACHED_TO_REPORT, DRILL_ATTRIBUTE, RecordedIncident
from supportlens.support.access import Support
from supportlens.topics import require_topics

MAX_ID = 128  # the contracts' longest id
_DRILL_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
SECOND_US = 1_000_000


def new_drill_id() -> str:
    """A short random id that tells this drill's records from every other's."""
    return secrets.token_hex(4)


def check_drill_id(drill_id: str) -> str:
    if not _DRILL_ID.match(drill_id):
        raise UserError(f"{drill_id[:40]!r} is not a drill id",
                        hint="1–32 lowercase letters, digits and dashes, e.g. 3f9a1c2b")
    return drill_id


@dataclass(frozen=True)
class Drill:
    """How one drill moves records: ids, times and pace (pure)."""

    drill_id: str
    origin_us: int  # the recorded window's start
    start_us: int  # where the window starts in the drill (now, when it runs)
    speed: float  # recorded seconds per wall second; 0 = as fast as possible

    def remap(self, original: str) -> str:
        """``drill-<drill id>-<original>``, at most 128 characters: a long original keeps its head and
        gets a hash of the whole, so the mapping stays deterministic and distinct ids stay distinct.
        An empty id stays empty (there was nothing to point to)."""
        if not original:
            return original
        prefix = f"drill-{self.drill_id}-"
        mapped = prefix + original
        if len(mapped) <= MAX_ID:
            return mapped
        digest = hashlib.sha256(original.encode()).hexdigest()[:16]
        return f"{prefix}{original[:MAX_ID - len(prefix) - 17]}~{digest}"

    def shift(self, at_us: int) -> int:
        """A recorded event time moved into the drill."""
        return at_us - self.origin_us + self.start_us

    def due_s(self, at_us: int) -> float:
        """Wall-clock seconds after the drill's start at which a record of this (recorded) time is sent."""
        return 0.0 if self.speed <= 0 else max(0, at_us - self.origin_us) / SECOND_US / self.speed


def _marked(drill: Drill, attributes: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
    out = dict(attributes)
    if ATTACHED_TO_REPORT in out and isinstance(out[ATTACHED_TO_REPORT], str):
        out[ATTACHED_TO_REPORT] = drill.remap(out[ATTACHED_TO_REPORT])
    out[DRILL_ATTRIBUTE] = True
    return out


def drill_span(span: Span, drill: Drill) -> Span:
    """The span as the drill replays it: shifted, re-identified, marked; everything else as recorded."""
    return msgspec.structs.replace(
        span, request_id=drill.remap(span.request_id), trace_id=drill.remap(span.trace_id),
        start_us=drill.shift(span.start_us), attributes=_marked(drill, span.attributes),
    )


def drill_report(report: FaultReport, drill: Drill) -> FaultReport:
    """The report as the drill replays it; its request ids and client log move with it."""
    return msgspec.structs.replace(
        report, report_id=drill.remap(report.report_id), received_at_us=drill.shift(report.received_at_us),
        request_ids=[drill.remap(rid) for rid in report.request_ids],
        client_log=[drill_span(span, drill) for span in report.client_log],
        attributes=_marked(drill, report.attributes),
    )


def replay_window(incident: RecordedIncident, lead_s: int, tail_s: int, now_us: int) -> tuple[int, int]:
    """The recorded window a drill replays: ``lead_s`` before the start to ``tail_s`` after the end
    (or now, for an incident not yet resolved)."""
    end = incident.resolved_at_us if incident.resolved_at_us is not None else now_us
    return incident.started_at_us - lead_s * SECOND_US, max(end, incident.started_at_us) + tail_s * SECOND_US


# -- the replay (I/O) ----------------------------------------------------------------------


@dataclass(frozen=True)
class DrillOptions:
    incident_id: str
    speed: float = 60.0
    lead_s: int = 900
    tail_s: int = 300
    drill_id: str = ""  # default: a new random one


@dataclass(frozen=True)
class DrillSummary:
    drill_id: str
    incident: RecordedIncident
    window_us: tuple[int, int]  # recorded
    drill_start_us: int
    counts: dict[str, int]  # logical topic → spans or reports sent
    records: dict[str, int]  # logical topic → Kafka records they went in (spans in batches)
    refused: int  # records the contracts refused after the transform (not sent)
    skipped: list[str]  # why, for the first 20 of them
    logs_lost: int  # reports whose client log could not be rebuilt from the store


def _spans(support: Support, since_us: int, until_us: int) -> Iterator[tuple[int, int, Span | FaultReport, int]]:
    after = ""
    while True:
        page = support.recorded_spans(since_us, until_us, after, 5000)
        for span in page.spans:
            yield span.start_us, 0, span, 0
        if not page.next:
            return
        after = page.next


def _reports(support: Support, since_us: int, until_us: int) -> Iterator[tuple[int, int, Span | FaultReport, int]]:
    after = ""
    while True:
        page = support.recorded_reports(since_us, until_us, after, 200)
        for item in page.reports:
            yield item.report.received_at_us, 1, item.report, item.client_log_spans
        if not page.next:
            return
        after = page.next


def run_drill(
    settings: Settings,
    support: Support,
    options: DrillOptions,
    progress: Callable[[int, int, int], None] | None = None,
    now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
) -> DrillSummary:
    """Replay an incident's recorded window into Kafka; returns what was sent.

    ``progress(recorded_seconds_done, recorded_seconds_total, records_sent)`` follows the
    replay. Raises :class:`UserError` for an unknown incident, a drill incident, a window
    with nothing recorded, and when ClickHouse or Kafka cannot be used.
    """
    if options.speed < 0:
        raise UserError(f"--speed must be 0 (as fast as possible) or above, got {options.speed}")
    if options.lead_s < 0 or options.tail_s < 0:
        raise UserError("--lead and --tail must not be negative")
    drill_id = check_drill_id(options.drill_id or new_drill_id())
    try:
        return _replay(settings, support, options, drill_id, progress, now_us)
    except ClickHouseError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ClickHouse failed while reading the recorded incident: {first}",
                        hint="check SUPPORTLENS_CLICKHOUSE_DSN and that the server is up; "
                             "records sent so far stay marked as this drill") from None


def _replay(settings: Settings, support: Support, options: DrillOptions, drill_id: str,
            progress: Callable[[int, int, int], None] | None, now_us: Callable[[], int]) -> DrillSummary:
    incident = support.recorded_incident(options.incident_id)
    if incident.drill:
        raise UserError(f"{incident.incident_id} is itself a drill",
                        hint="drill the real incident it was replayed from")
    since, until = replay_window(incident, options.lead_s, options.tail_s, now_us())
    # by event time; a span before a report of the same microsecond (the key never compares records)
    records = heapq.merge(_spans(support, since, until), _reports(support, since, until), key=lambda r: r[:2])
    first = next(records, None)
    if first is None:
        raise UserError(f"nothing of {incident.incident_id} is recorded: no spans or fault reports "
                        f"in its window ({_utc(since)} – {_utc(until)})",
                        hint="spans are kept 14 days by default (SUPPORTLENS_CLICKHOUSE_TTL_DAYS)")
    require_topics(settings, ("client-spans", "server-spans", "fault-reports"))
    drill = Drill(drill_id, origin_us=since, start_us=now_us(), speed=options.speed)
    producer = BulkProducer(settings)
    counts: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    skipped: list[str] = []
    refused = 0
    logs_lost = 0
    total_s = max(1, (until - since) // SECOND_US)
    reported_s = -1
    pending: list[tuple[str, Span]] = []  # the spans of the recorded second being replayed
    pending_s = -1
    wall_start = time.monotonic()

    def send_pending() -> None:
        for topic, batch in pack_spans(pending, settings.partitions, settings.max_record_bytes):
            producer.send(settings.topic(topic), batch.key, batch.value, batch.latest_us, batch.partition)
            sent[topic] += 1
        pending.clear()

    for at_us, _, record, log_length in itertools.chain([first], records):
        done_s = (at_us - since) // SECOND_US
        # a recorded second's spans go as batch records before anything later, and before a
        # report (which names requests of earlier seconds): the pipeline sees event-time order
        if pending and (done_s != pending_s or not isinstance(record, Span)):
            send_pending()
        delay = wall_start + drill.due_s(at_us) - time.monotonic()
        if delay > 0:
            producer.wait(delay)
            delay = wall_start + drill.due_s(at_us) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if isinstance(record, Span):
            topic, out, key, ts_us = _span_out(record, drill)
        else:
            logs_lost += log_length > len(record.client_log)
            topic, out, key, ts_us = _report_out(record, drill)
        value = encode(out)
        try:
            decode(value, type(out), settings.max_record_bytes)
        except InvalidRecord as exc:
            refused += 1
            if len(skipped) < 20:
                skipped.append(f"{topic} {key}: {exc.reason}")
            continue
        if isinstance(out, Span):
            pending.append((topic, out))
            pending_s = done_s
        else:
            producer.send(settings.topic(topic), key, value, ts_us)
            sent[topic] += 1
        counts[topic] += 1
        if progress and done_s != reported_s:
            reported_s = done_s
            progress(min(done_s, total_s), total_s, sum(sent.values()))
        if producer.failed:
            break
    send_pending()
    producer.finish(f"drill {drill_id} is incomplete; records sent so far stay marked as this drill",
                    hint=f"check the broker at {settings.kafka_bootstrap}")
    if progress:
        progress(total_s, total_s, sum(sent.values()))
    return DrillSummary(drill_id=drill_id, incident=incident, window_us=(since, until), drill_start_us=drill.start_us,
                        counts=dict(counts), records=dict(sent), refused=refused, skipped=skipped,
                        logs_lost=logs_lost)


def _span_out(span: Span, drill: Drill) -> tuple[str, Span, str, int]:
    out = drill_span(span, drill)
    return ("client-spans" if span.side == "client" else "server-spans"), out, out.request_id, out.start_us


def _report_out(report: FaultReport, drill: Drill) -> tuple[str, FaultReport, str, int]:
    out = drill_report(report, drill)
    return "fault-reports", out, out.report_id, out.received_at_us


def _utc(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / SECOND_US, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
