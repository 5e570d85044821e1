"""The Faust worker: agents move records and call the pure functions of ``correlate``/``diagnose``.

Topology (all joined topics co-partitioned by request id):

    fault-reports ──rekey──▶ reports-by-request ─┐
    client-spans ────────────────────────────────┼─▶ correlate ─▶ (table: pending) ─timer─▶ requests
    server-spans ────────────────────────────────┘                                 └──────▶ reports-diagnosed

Beside it, surge detection and incident management (``streams.signals``, ``streams.detect``):

    spans, fault reports ──count──▶ incident-signals (1 partition) ─▶ detect ─▶ surges, incidents
    (every worker, partial counts + its clock)        supportlens declare/resolve ─┘

The detect agent owns the one partition of ``incident-signals``: one global view of every
dimension, fed with partial counts (a few records per second per worker, whatever the span
rate). Its state is one record in a changelog-backed table, written with every batch.

Guarantees: state changes are written to the table's changelog before the input offset
is committed (Faust flushes its producer first), so a killed worker restarts with every
span it had acknowledged; a request leaves the table only after it was sent, so a crash
can only repeat an emission, never lose one, and a repeated request is identical (its
version is its span count).
"""

from __future__ import annotations

import heapq
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict, defaultdict
from typing import Any

import faust
from faust.types import TP
from aiokafka.partitioner import DefaultPartitioner

from supportlens.config import Settings
from supportlens.contracts import (
    FaultReport, IncidentCommand, InvalidRecord, MisuseCount, SignalClock, SignalCount, Span, decode, decode_signal,
    encode, is_drill,
)
from supportlens.kafka_security import faust_credentials
from supportlens.log_floods import quiet_repeats
from supportlens.metrics import Metrics, process_metrics, serve_metrics
from streams.catalog import Catalog
from streams.detect import EngineConfig, Outputs, SurgeEngine, pack_core, pack_key, slim, unpack_state
from streams.accounts_cache import AccountsCache
from streams.incidents import Policy
from streams.notices import Notifier
from streams.signals import SignalAggregator, count_new_failures, failure_dimensions
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
SIGNAL_FLUSH_S = 1.0
LAG_EVERY_S = 5.0
ENGINE_KEY = b"engine"  # the incident book, notices and clocks; b"key:<dimension=value>" for each value
KEY_PREFIX = b"key:"
LARGEST_STATE_RECORD = 900_000  # under Kafka's default 1 MB record limit, with room for the envelope


def create_app(settings: Settings, catalog: Catalog, timing: Timing, policy: Policy, engine_config: EngineConfig,
               notifier: Notifier | None = None, metrics: Metrics | None = None) -> faust.App:
    """A Faust app wired to ``settings``; nothing runs until a worker starts it."""
    metrics = metrics or process_metrics()
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    app = faust.App(
        f"{settings.topic_prefix}worker",
        # one URL per bootstrap server: Faust does not split librdkafka's comma-separated list
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",") if server.strip()],
        broker_credentials=faust_credentials(settings),  # the same security as every other client
        store="memory://",
        datadir=str(settings.state_dir / "faust" / "{conf.id}"),  # not the current directory
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
        "client-spans", "server-spans", "fault-reports", "reports-by-request", "requests", "reports-diagnosed", "dlq",
        "incident-signals", "surges", "incidents", "notifications")}
    logical_of = {full: logical for logical, full in name.items()}
    joined = app.topic(name["client-spans"], name["server-spans"], name["reports-by-request"], **raw)
    reports_in = app.topic(name["fault-reports"], **raw)
    reports_by_request = app.topic(name["reports-by-request"], **raw)
    requests_out = app.topic(name["requests"], **raw)
    diagnosed_out = app.topic(name["reports-diagnosed"], **raw)
    dlq = app.topic(name["dlq"], **raw)
    signals = app.topic(name["incident-signals"], partitions=1, **raw)
    surges_out = app.topic(name["surges"], **raw)
    incidents_out = app.topic(name["incidents"], **raw)
    notifications_out = app.topic(name["notifications"], **raw)
    accounts_box: list[AccountsCache] = []  # read only by the worker that owns incident-signals
    # one partition, like its source: the surge detector and incident manager see everything
    engine_table = app.Table("incident_engine", partitions=1, use_partitioner=True, key_type=bytes, value_type=bytes)
    source = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    aggregator = SignalAggregator(source=source, bucket_s=engine_config.surge.bucket_s, sketch_k=engine_config.sketch_k)
    engine_box: list[SurgeEngine] = []  # the engine of this worker, while it owns incident-signals
    last_flush = [time.time()]
    positions: dict[tuple[str, int], int] = {}  # (topic, partition) → last offset read
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

    def caught_up(side: str, partition: int) -> bool:
        """Has this worker read everything the broker has for this side and partition?"""
        return topic_caught_up((name["client-spans" if side == "client" else "server-spans"], partition))

    def topic_caught_up(tp: object) -> bool:
        topic, partition = tp  # type: ignore[misc]
        try:
            high = app.consumer.highwater(TP(topic, partition))
        except Exception:  # not assigned (any more), or no fetch yet: nothing to wait for here
            return True
        if not high:
            return True
        last = positions.get((topic, partition))
        return last is not None and last + 1 >= high

    def progress(event: faust.types.EventT, now: float) -> None:
        message = event.message
        positions[(message.topic, message.partition)] = message.offset
        if message.timestamp:
            metrics.processing_latency.labels("worker").observe(max(0.0, now - message.timestamp))

    def flush_signals(now: float) -> None:
        """Send this worker's partial counts and clock (buffered: they precede the offset commit)."""
        last_flush[0] = now
        for signal in aggregator.flush(topic_caught_up, int(now * 1_000_000)):
            signals.send_soon(key=source.encode(), value=encode(signal))
        metrics.last_progress.labels("worker").set(now)

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
        # Faust refuses to send a record with neither key nor value (its assertion crashed the
        # agent): a tombstone without a key goes as an empty value, its origin in the headers.
        value = b"" if event.key is None and event.value is None else event.value
        await dlq.send(key=event.key, value=value,
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
            progress(event, time.time())
            report = decode_or_none(event, FaultReport)
            if isinstance(report, InvalidRecord):
                await dead_letter(event, report.reason)
                continue
            aggregator.saw((event.message.topic, event.message.partition), report.received_at_us,
                           is_drill(report.attributes))
            aggregator.report(report)
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
                # Every record counts as read, also one that is dead-lettered below: otherwise
                # this partition never looks caught up and its silence fallback never fires.
                progress(event, now)
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
                    aggregator.saw((event.message.topic, partition), record.start_us, is_drill(record.attributes))
                    if state is None:
                        aggregator.request(record)
                    state, changed = add_span(state, record, now, ts_ms)
                    if not changed:
                        metrics.duplicates.inc()
                    else:
                        count_failure(state, record)
                else:
                    state, changed = add_report(state, record, key.decode(), now, ts_ms)
                if changed:
                    touched[key] = (state, partition)
            for key, (state, partition) in touched.items():
                pending[key] = dump(state)
                emitted.pop(key, None)  # back in the table until it is emitted again
                file(key, state, partition)
            if now - last_flush[0] >= SIGNAL_FLUSH_S:
                flush_signals(now)

    def count_failure(state: Pending, span: Span) -> None:
        """Count a request as failed in each dimension once, at its first evidence there."""
        new = count_new_failures(state.counted, failure_dimensions(span, catalog))
        if new:
            state.counted.extend(new)
            aggregator.failure(span, new)

    @app.timer(SIGNAL_FLUSH_S)
    async def flush_idle() -> None:
        """A worker without traffic still tells the detector that time goes on."""
        now = time.time()
        if now - last_flush[0] >= SIGNAL_FLUSH_S:
            flush_signals(now)

    @app.agent(signals)
    async def detect(stream: faust.StreamT) -> None:
        """Sum the workers' counts, detect surges, manage incidents (one partition: one instance)."""
        async for batch in stream.take_events(BATCH, within=BATCH_WAIT_S):
            engine = current_engine()
            out = Outputs()
            now = time.time()
            for event in batch:
                metrics.events_in.labels("incident-signals").inc()
                progress(event, now)
                try:
                    signal = decode_signal(event.value or b"", settings.max_record_bytes)
                except InvalidRecord as exc:
                    await dead_letter(event, exc.reason)
                    continue
                if isinstance(signal, SignalCount):
                    engine.on_count(signal)
                elif isinstance(signal, SignalClock):
                    out.extend(engine.on_clock(signal, now))
                elif isinstance(signal, MisuseCount):
                    out.extend(engine.on_misuse(signal))
                elif isinstance(signal, IncidentCommand):
                    out.extend(engine.on_command(signal))
            # the state first, the outputs second: both are buffered in order and flushed
            # before the offsets are committed, so a crash repeats identical outputs at most
            save_engine(engine)
            publish(out)

    def current_engine() -> SurgeEngine:
        if not engine_box:
            keys = {k[len(KEY_PREFIX):].decode(): v for k, v in engine_table.items()
                    if k.startswith(KEY_PREFIX) and v is not None}
            state = unpack_state(engine_table.get(ENGINE_KEY), keys)
            if not accounts_box:
                accounts_box.append(AccountsCache(settings).start())
            engine_box.append(SurgeEngine(engine_config, policy, catalog.team_of, state,
                                          notifier=notifier, accounts=accounts_box[0].accounts))
            show_incidents(engine_box[0])
        return engine_box[0]

    def save_engine(engine: SurgeEngine) -> None:
        """Store what changed: each changed dimension value in a record of its own, then the rest."""
        for key in engine.take_dirty():
            entry = engine.state.keys.get(key)
            if entry is None:
                continue
            packed = pack_key(entry)
            if len(packed) > LARGEST_STATE_RECORD:
                # degrade, never crash: the counts survive a restart, this backlog's user detail does not
                log.error("incidents: the state of %s is %d bytes compressed; storing it without the users of "
                          "its %d open buckets", key, len(packed), len(entry.open))
                metrics.incident_state_slimmed.inc()
                packed = pack_key(slim(entry))
            engine_table[KEY_PREFIX + key.encode()] = packed
        engine_table[ENGINE_KEY] = pack_core(engine.state)

    @engine_table.on_recover
    async def reload_engine() -> None:
        engine_box.clear()  # rebuilt from the recovered table at the next batch
        if engine_table.get(ENGINE_KEY) is not None:
            engine = current_engine()
            log.info("incidents: %d open after recovery", len(engine.book.open_incidents()))

    def publish(out: Outputs) -> None:
        for surge in out.surges:
            surges_out.send_soon(key=f"{surge.dimension}={surge.value}".encode(), value=encode(surge))
            metrics.events_out.labels("surges").inc()
            if surge.phase == "end":
                with_suppressed_keyerror(metrics.surge_score.remove, surge.dimension, surge.value)
            else:
                metrics.surge_score.labels(surge.dimension, surge.value).set(surge.score)
                if surge.phase == "start":
                    metrics.surges_started.labels(surge.dimension).inc()
        for incident in out.incidents:
            incidents_out.send_soon(key=incident.incident_id.encode(), value=encode(incident))
            metrics.events_out.labels("incidents").inc()
            metrics.incident_transitions.labels(incident.transition).inc()
            log.warning("incident %s %s (%s, %s): %s", incident.incident_id, incident.transition,
                        incident.severity, incident.root_key, incident.reason)
        for notification in out.notifications:
            notifications_out.send_soon(key=notification.account_id.encode(), value=encode(notification))
            metrics.events_out.labels("notifications").inc()
            log.info("notification %s (%s) to account %s%s", notification.notification_id, notification.kind,
                     notification.account_id, " [drill]" if notification.drill else "")
        if out.incidents and engine_box:
            show_incidents(engine_box[0])

    shown: set[tuple[str, str, str, str]] = set()

    def show_incidents(engine: SurgeEngine) -> None:
        """Open incidents as gauges: the alert rules fire on them, and stop when they resolve."""
        now_open = {(i.incident_id, i.severity, i.root_key, str(i.drill).lower()): i
                    for i in engine.book.open_incidents()}
        for labels in shown - set(now_open):
            with_suppressed_keyerror(metrics.incident_open_started.remove, *labels)
        for labels, incident in now_open.items():
            metrics.incident_open_started.labels(*labels).set(incident.started_at_us / 1e6)
        shown.clear()
        shown.update(now_open)
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for incident in now_open.values():
            counts[(incident.severity, str(incident.drill).lower())] += 1
        for severity in ("sev1", "sev2", "sev3", "sev4"):
            for drill in ("false", "true"):
                metrics.incidents_open.labels(severity, drill).set(counts.get((severity, drill), 0))

    @app.timer(LAG_EVERY_S)
    async def measure_lag() -> None:
        lag: dict[str, int] = defaultdict(int)
        for tp in app.consumer.assignment():
            try:
                high = app.consumer.highwater(tp)
            except Exception:  # no fetch yet
                continue
            if high:
                read = positions.get((tp.topic, tp.partition), -1)
                lag[logical_of.get(tp.topic, tp.topic)] += max(0, high - read - 1)
        for topic, records in lag.items():
            metrics.consumer_lag.labels("worker", topic).set(records)

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
        drill = any(is_drill(span.attributes) for span in state.spans)
        request = build_request(key.decode(), state, catalog, drill) if state.spans else None
        if request is not None and len(state.spans) > state.emitted_version:
            # send_soon: Faust's producer buffer, FIFO with the table's changelog writes and
            # flushed before any offset commit, so the request precedes its deletion.
            requests_out.send_soon(key=key, value=encode(request))
            metrics.events_out.labels("requests").inc()
            metrics.emit_delay.observe(now - state.first_seen_s)
        for report in state.reports:
            diagnosed = diagnose_report(report, request, catalog, int(now * 1_000_000), is_drill(report.attributes))
            diagnosed_out.send_soon(key=report.report_id.encode(), value=encode(diagnosed))
            metrics.events_out.labels("reports-diagnosed").inc()
        mark_emitted(state, now)

    return app


def with_suppressed_keyerror(remove: Any, *labels: str) -> None:
    try:
        remove(*labels)
    except KeyError:  # never set in this process (e.g. before a restart)
        pass


def run_worker(settings: Settings, catalog: Catalog, timing: Timing, policy: Policy, engine_config: EngineConfig,
               notifier: Notifier | None = None, loglevel: str = "info") -> None:
    """Run the worker until SIGINT/SIGTERM (blocking)."""
    from supportlens.topics import provision

    provision(settings)
    serve_metrics(settings, settings.worker_metrics_port, "worker")
    app = create_app(settings, catalog, timing, policy, engine_config, notifier)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    quiet_repeats("aiokafka")  # Faust's Kafka client: one line a minute per complaint while a broker is away
    worker.execute_from_commandline()
