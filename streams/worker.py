"""The Faust worker: agents move records and call the pure functions of ``correlate``/``diagnose``.

Topology (all joined topics co-partitioned by request id):

    fault-reports ──rekey──▶ reports-by-request ─┐
    client-spans ────────────────────────────────┼─▶ correlate ─▶ (table: pending) ─timer─▶ requests
    server-spans ────────────────────────────────┘                                 └──────▶ reports-diagnosed

Guarantees: state changes are written to the table's changelog before the input offset
is committed (Faust flushes its producer first), so a killed worker restarts with every
span it had acknowledged; a request leaves the table only after it was sent, so a crash
can only repeat an emission, never lose one, and a repeated request is identical (its
version is its span count).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
import logging
import time
from typing import Any

import faust
from faust.types import TP
from aiokafka.partitioner import DefaultPartitioner

from supportlens.config import Settings
from supportlens.contracts import FaultReport, InvalidRecord, Span, decode, encode
from supportlens.metrics import Metrics
from streams.catalog import Catalog
from streams.correlate import (
    Pending,
    SideClock,
    Timing,
    add_report,
    add_span,
    build_request,
    due_at,
    dump,
    expired,
    load,
    mark_emitted,
    waiting_for,
)
from streams.dead_letters import dead_letter_headers
from streams.diagnose import diagnose_report, primary_request_id

log = logging.getLogger(__name__)
TICK_S = 0.25
BATCH = 1000
BATCH_WAIT_S = 0.05
MAX_EMITTED_IN_MEMORY = 200_000


def create_app(settings: Settings, catalog: Catalog, timing: Timing, metrics: Metrics | None = None) -> faust.App:
    """A Faust app wired to ``settings``; nothing runs until a worker starts it."""
    metrics = metrics or Metrics()
    app = faust.App(
        f"{settings.topic_prefix}worker",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_enabled=False,
        producer_acks=-1,
        stream_wait_empty=False,
        # Every state change is a changelog record: without lingering, each became a
        # produce request of its own and the worker spent its time waiting on sockets.
        producer_linger=0.02,
        producer_max_batch_size=1_048_576,
        broker_max_poll_records=5000,
        key_serializer="raw",  # records are msgspec JSON, decoded by us: Faust passes bytes through
        value_serializer="raw",
    )
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    name = {logical: settings.topic(logical) for logical in (
        "client-spans", "server-spans", "fault-reports", "reports-by-request", "requests", "reports-diagnosed", "dlq")}
    logical_of = {full: logical for logical, full in name.items()}
    joined = app.topic(name["client-spans"], name["server-spans"], name["reports-by-request"], **raw)
    reports_in = app.topic(name["fault-reports"], **raw)
    reports_by_request = app.topic(name["reports-by-request"], **raw)
    requests_out = app.topic(name["requests"], **raw)
    diagnosed_out = app.topic(name["reports-diagnosed"], **raw)
    dlq = app.topic(name["dlq"], **raw)
    pending = app.Table("pending", partitions=settings.partitions, use_partitioner=True, key_type=bytes, value_type=bytes)
    # In memory, rebuilt from the table after recovery: requests that wait for no side, by
    # wall second; requests that wait for a side, per (partition, side) by record time.
    schedule: list[tuple[float, bytes]] = []
    # Emitted requests stay in memory (not in the table) for ``retain_s`` so a late span
    # makes a new version; a restart forgets them, and a late span then starts afresh.
    emitted: OrderedDict[bytes, Pending] = OrderedDict()
    waiting: dict[tuple[int, str], list[tuple[int, bytes]]] = {}
    clocks: dict[int, SideClock] = {}
    partitioner = DefaultPartitioner()
    all_partitions = list(range(settings.partitions))

    read_offsets: dict[tuple[str, int], int] = {}  # (side, partition) → last offset read

    def caught_up(side: str, partition: int) -> bool:
        """Has this worker read everything the broker has for this side and partition?"""
        topic = name["client-spans" if side == "client" else "server-spans"]
        try:
            high = app.consumer.highwater(TP(topic, partition))
        except Exception:  # not assigned (any more), or no fetch yet: nothing to wait for here
            return True
        if not high:
            return True
        last = read_offsets.get((side, partition))
        return last is not None and last + 1 >= high

    def clock(partition: int) -> SideClock:
        if partition not in clocks:
            clocks[partition] = SideClock(started_s=time.time())
        return clocks[partition]

    def file(key: bytes, state: Pending, partition: int | None = None) -> None:
        """Put a request where the timer will find it when it is due."""
        side = waiting_for(state)
        if side is None:
            heapq.heappush(schedule, (due_at(state, timing), key))
            return
        if partition is None:
            partition = partitioner(key, all_partitions, all_partitions)
        heapq.heappush(waiting.setdefault((partition, side), []), (state.ref_ms, key))

    async def dead_letter(event: faust.types.EventT, reason: str) -> None:
        message = event.message
        metrics.dead_letters.labels(logical_of.get(message.topic, message.topic)).inc()
        log.warning("dead letter from %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason)
        await dlq.send(key=event.key, value=event.value,
                       headers=dead_letter_headers(reason, message.topic, message.partition, message.offset))

    def decode_or_none(event: faust.types.EventT, record_type: type) -> Any:
        try:
            return decode(event.value or b"", record_type, settings.max_record_bytes)
        except InvalidRecord as exc:
            return exc

    @app.agent(reports_in)
    async def rekey_reports(stream: faust.StreamT) -> None:
        """Fault reports arrive keyed by report id; re-key each by the request it names."""
        async for event in stream.events():
            metrics.events_in.labels("fault-reports").inc()
            report = decode_or_none(event, FaultReport)
            if isinstance(report, InvalidRecord):
                await dead_letter(event, report.reason)
                continue
            key = primary_request_id(report) or report.report_id
            # keep the record time: the correlator compares it with the span streams' times
            await reports_by_request.send(key=key.encode(), value=event.value, timestamp=event.message.timestamp)

    @app.agent(joined)
    async def correlate(stream: faust.StreamT) -> None:
        # Batches, because Faust's cost is per record and per table write: a request's spans
        # in one batch cost one table write. Faust acks a batch only after this body ran.
        async for batch in stream.take_events(BATCH, within=BATCH_WAIT_S):
            now = time.time()
            touched: dict[bytes, tuple[Pending, int]] = {}
            for event in batch:
                topic = logical_of.get(event.message.topic, event.message.topic)
                metrics.events_in.labels(topic).inc()
                partition = event.message.partition
                if topic != "reports-by-request":
                    # Every record counts as read, also one that is dead-lettered below: otherwise
                    # this partition never looks caught up and its silence fallback never fires.
                    read_offsets[(topic.removesuffix("-spans"), partition)] = event.message.offset
                record = decode_or_none(event, FaultReport if topic == "reports-by-request" else Span)
                if isinstance(record, InvalidRecord):
                    await dead_letter(event, record.reason)
                    continue
                ts_ms = int((event.message.timestamp or now) * 1000)
                if isinstance(record, Span):
                    clock(partition).observe(record.side, ts_ms, now)
                    key = record.request_id.encode()
                    if event.key != key:
                        await dead_letter(event, f"record key {event.key!r} is not its request_id "
                                                 f"{record.request_id!r}: spans must be keyed by request id")
                        continue
                else:
                    key = event.key or record.report_id.encode()
                state = touched[key][0] if key in touched else current_state(key)
                if isinstance(record, Span):
                    state, changed = add_span(state, record, now, ts_ms)
                    if not changed:
                        metrics.duplicates.inc()
                else:
                    state, changed = add_report(state, record, key.decode(), now, ts_ms)
                if changed:
                    touched[key] = (state, partition)
            for key, (state, partition) in touched.items():
                pending[key] = dump(state)
                emitted.pop(key, None)  # back in the table until it is emitted again
                file(key, state, partition)

    def current_state(key: bytes) -> Pending | None:
        """What is known of a request: in the table while pending, in memory for a while after."""
        stored = pending.get(key)
        if stored is not None:
            return load(stored)
        return emitted.get(key)

    @pending.on_recover
    async def rebuild_schedule() -> None:
        """After a (re)start or rebalance, schedule every request this worker now owns."""
        schedule.clear()
        waiting.clear()
        clocks.clear()
        count = 0
        for key, value in pending.items():
            file(key, load(value))
            count += 1
        log.info("correlation: %d requests in flight after recovery", count)

    @app.timer(TICK_S)
    async def emit_due() -> None:
        now = time.time()
        due: list[bytes] = []
        while schedule and schedule[0][0] <= now:
            due.append(heapq.heappop(schedule)[1])
        for (partition, side), queue in waiting.items():
            side_clock = clock(partition)
            ready = caught_up(side, partition)
            while queue and side_clock.passed(side, queue[0][0], timing.grace_s, now, ready):  # type: ignore[arg-type]
                due.append(heapq.heappop(queue)[1])
        for key in due:
            stored = pending.get(key)
            if stored is None:
                continue  # emitted already, or its partition moved to another worker
            state = load(stored)
            if not is_due(key, state, now):
                file(key, state)  # news since it was filed changed what it waits for
                continue
            act(key, state, now)
            # Sent first, forgotten second: a crash in between repeats an identical request.
            del pending[key]
            if state.spans:
                emitted[key] = state
        while emitted:
            key, state = next(iter(emitted.items()))
            if not expired(state, timing, now) and len(emitted) <= MAX_EMITTED_IN_MEMORY:
                break
            del emitted[key]

    def is_due(key: bytes, state: Pending, now: float) -> bool:
        side = waiting_for(state)
        if side is None:
            return due_at(state, timing) <= now
        partition = partitioner(key, all_partitions, all_partitions)
        return clock(partition).passed(side, state.ref_ms, timing.grace_s, now, caught_up(side, partition))

    def act(key: bytes, state: Pending, now: float) -> None:
        """Send the request if it knows more than what was sent, and answer waiting reports."""
        request = build_request(key.decode(), state, catalog) if state.spans else None
        if request is not None and len(state.spans) > state.emitted_version:
            # send_soon: Faust's producer buffer, FIFO with the table's changelog writes and
            # flushed before any offset commit, so the request precedes its deletion.
            requests_out.send_soon(key=key, value=encode(request))
            metrics.events_out.labels("requests").inc()
            metrics.emit_delay.observe(now - state.first_seen_s)
        for report in state.reports:
            diagnosed = diagnose_report(report, request, catalog, int(now * 1_000_000))
            diagnosed_out.send_soon(key=report.report_id.encode(), value=encode(diagnosed))
            metrics.events_out.labels("reports-diagnosed").inc()
        mark_emitted(state, now)

    return app


def run_worker(settings: Settings, catalog: Catalog, timing: Timing, loglevel: str = "info") -> None:
    """Run the worker until SIGINT/SIGTERM (blocking)."""
    from supportlens.topics import provision

    provision(settings)
    app = create_app(settings, catalog, timing)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
