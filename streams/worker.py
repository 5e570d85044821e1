"""The Faust worker: agents move records and call the pure functions of ``correlate``/``diagnose``.

Topology (all joined topics co-partitioned by request id):

    otlp-spans ──normalize, re-key──▶ server-spans
    fault-reports ──rekey──▶ reports-by-request ─┐
    client-spans ────────────────────────────────┼─▶ correlate ─▶ (memory: streams.join) ─timer─▶ requests
    server-spans ────────────────────────────────┘                                      └──────▶ reports-diagnosed

Span records carry one span or a batch of spans of one partition (``supportlens.span_batches``).

Beside it, surge detection and incident management (``streams.signals``, ``streams.detect``):

    spans, fault reports ──count──▶ incident-signals (1 partition) ─▶ detect ─▶ surges, incidents
    (every worker, partial counts + its clock)        supportlens declare/resolve ─┘

The detect agent owns the one partition of ``incident-signals``: one global view of every
dimension, fed with partial counts (a few records per second per worker, whatever the span
rate). Its state is one record per changed dimension value in a changelog-backed table.

Guarantees: the join's state is in memory and costs no write per request. Every input
record is held until the requests it touched were emitted, Kafka confirmed them and a grace
passed, and records are acknowledged in read order (``streams.join``); Faust commits only
below the first record still held. A killed worker re-reads from there and rebuilds every
request in flight: it can repeat an emission, never lose one, and a version always means
the same spans.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from functools import partial
from typing import Any

import faust
import msgspec
from faust.types import TP

from supportlens.config import Settings
from supportlens.contracts import (
    Change, ChangeSignal, FaultReport, IncidentCommand, InvalidRecord, MisuseCount, ReportStep, SequenceStep,
    SignalClock, SignalCount, Span, SurgeEvent, VersionCount, decode, decode_signal, encode, is_drill,
)
from supportlens.otlp import RequestIdRule
from supportlens.otlp_records import normalize_export_record
from supportlens.span_batches import SpanBatcher, decode_spans, partition_of, rejected_reason
from supportlens.kafka_security import faust_credentials
from supportlens.log_floods import quiet_repeats
from supportlens.metrics import Metrics, process_metrics, serve_metrics
from streams.catalog import Catalog
from streams.detect import EngineConfig, Outputs, SurgeEngine, pack_core, pack_key, slim, unpack_state
from streams.accounts_cache import AccountsCache
from streams.incidents import Policy
from streams.notices import Notifier
from streams.signals import SignalAggregator, count_new_failures, failure_dimensions
from streams.correlate import Pending, Timing, build_request, mark_emitted
from streams.join import Emission, Entry, Held, Holds, Join
from streams.outbox import Outbox
from streams.recall import Recalled, read_emitted
from streams.dead_letters import dead_letter_headers
from streams.diagnose import diagnose_report, primary_request_id
from streams import sequence_agent
from streams.sequences import explained_classes, user_key, watched

log = logging.getLogger(__name__)
TICK_S = 0.25
BATCH = 1000
BATCH_WAIT_S = 0.05
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
        broker_session_timeout=settings.worker_session_timeout_s,
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
        "incident-signals", "surges", "incidents", "notifications", "otlp-spans", "changes", "behaviour", "user-steps",
        "misuse-detections")}
    logical_of = {full: logical for logical, full in name.items()}
    joined = app.topic(name["client-spans"], name["server-spans"], name["reports-by-request"], **raw)
    reports_in = app.topic(name["fault-reports"], **raw)
    changes_in = app.topic(name["changes"], partitions=1, **raw)
    otlp_in = app.topic(name["otlp-spans"], **raw)
    reports_by_request = app.topic(name["reports-by-request"], **raw)
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
    join = Join(timing, ack=lambda message: message.ack(app.consumer), max_retained=settings.correlation_max_retained)
    # per joined partition, what was emitted before this worker got it (streams.recall), and
    # when: a report about such a request finds it there for ``retain_s``
    recalled: dict[int, tuple[float, Recalled]] = {}
    recalling: dict[int, int] = {}  # partition → its assignment, while being read back
    assignments = [0]
    outbox = Outbox(settings, metrics, logical_of)
    requests_written = metrics.events_out.labels("requests")
    duplicates = metrics.duplicates
    span_topics = {name["client-spans"]: "client", name["server-spans"]: "server"}
    joined_topics = {name["client-spans"], name["server-spans"], name["reports-by-request"]}
    # How far each input partition's records were counted in the surge signals, one record
    # per partition a second (not per request): a restarted worker re-reads up to ``grace``
    # seconds of input to rebuild its requests, and must not count them a second time.
    signal_offsets = app.Table("signal_offsets", partitions=settings.partitions, use_partitioner=True,
                               key_type=bytes, value_type=bytes)
    counted_through: dict[tuple[str, int], int] = {}
    offsets_keys = [key_for_partition(b"counted-through", p, settings.partitions) for p in range(settings.partitions)]

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
        """Send this worker's partial counts and clock, then how far each partition was counted
        (buffered in that order: Faust flushes them before it commits an offset)."""
        last_flush[0] = now
        for signal in aggregator.flush(topic_caught_up, int(now * 1_000_000)):
            signals.send_soon(key=source.encode(), value=encode(signal))
        by_partition: dict[int, dict[str, int]] = defaultdict(dict)
        for (topic, partition), offset in positions.items():
            if topic in joined_topics and counted_through.get((topic, partition)) != offset:
                counted_through[(topic, partition)] = offset
                by_partition[partition][topic] = offset
        for partition, offsets in by_partition.items():
            stored = decode_offsets(signal_offsets.get(offsets_keys[partition]))
            signal_offsets[offsets_keys[partition]] = _offsets_encoder.encode(stored | offsets)
        metrics.last_progress.labels("worker").set(now)

    @signal_offsets.on_recover
    async def reload_counted() -> None:
        counted_through.clear()
        for partition, key in enumerate(offsets_keys):
            for topic, offset in decode_offsets(signal_offsets.get(key)).items():
                counted_through[(topic, partition)] = offset

    def dead_letter(message: Any, held: Held, key: bytes | None, value: bytes | None, reason: str,
                    book: Holds | None = None, position: int | None = None) -> None:
        """To ``dlq`` with its origin (and ``position``, a bad span's place in its batch); the input
        record stays held until Kafka has the dead letter."""
        metrics.dead_letters.labels(logical_of.get(message.topic, message.topic)).inc()
        log.warning("dead letter from %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason)
        held.open += 1
        done = partial((book or join.holds).release, (held,))
        # a tombstone stays one (its value None): the dead letter is the record untouched
        outbox.send(name["dlq"], key, value, done,
                    headers=dead_letter_headers(reason, message.topic, message.partition, message.offset, position))

    async def dead_letter_event(event: faust.types.EventT, reason: str) -> None:
        """A dead letter from an agent that lets Faust acknowledge its records."""
        message = event.message
        metrics.dead_letters.labels(logical_of.get(message.topic, message.topic)).inc()
        log.warning("dead letter from %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason)
        # Faust refuses to send a record with neither key nor value (its assertion crashed the
        # agent): a tombstone without a key goes as an empty value, its origin in the headers.
        value = b"" if event.key is None and event.value is None else event.value
        await dlq.send(key=event.key, value=value,
                       headers=dead_letter_headers(reason, message.topic, message.partition, message.offset))

    # the catalog's sequence rules (streams/sequences.py): which requests and reports go to the
    # user-keyed sequence agent; nothing else of the span rate does
    watched_operations, watched_attributes = watched(catalog)
    explained = explained_classes(catalog)
    sequence_agent.install(app, settings, catalog, metrics, name, progress, dead_letter_event, signals, source)

    def forward_step(held: Held, span: Span, drill: bool) -> None:
        """A watched request to its user's sequence state; its input record stays held until
        Kafka has it."""
        key = user_key(span.user_id, span.account_id)
        if not key:
            return
        attributes = {k: v for k, v in span.attributes.items() if k in watched_attributes}
        session = attributes.pop("session_id", "")
        step = SequenceStep(user_id=span.user_id, account_id=span.account_id, ts_us=span.start_us,
                            name=span.operation, request_id=span.request_id, session_id=str(session),
                            attributes=attributes, drill=drill or is_drill(span.attributes))
        held.open += 1
        outbox.send(name["user-steps"], key.encode(), encode(step), partial(join.holds.release, (held,)))

    @app.agent(reports_in)
    async def rekey_reports(stream: faust.StreamT) -> None:
        """Fault reports arrive keyed by report id; re-key each by the request it names."""
        async for event in stream.events():
            metrics.events_in.labels("fault-reports").inc()
            progress(event, time.time())
            try:
                report = decode(event.value or b"", FaultReport, settings.max_record_bytes)
            except InvalidRecord as exc:
                await dead_letter_event(event, exc.reason)
                continue
            aggregator.saw((event.message.topic, event.message.partition), report.received_at_us,
                           is_drill(report.attributes))
            aggregator.report(report)
            key = primary_request_id(report) or report.report_id
            # keep the record time: the correlator compares it with the span streams' times
            await reports_by_request.send(key=key.encode(), value=event.value, timestamp=event.message.timestamp)

    @app.agent(changes_in)
    async def forward_changes(stream: faust.StreamT) -> None:
        """Changes go to the incident manager in order with the counts (its suspects), so a
        restarted worker re-reads them in the same order and ranks the same suspects."""
        async for event in stream.events():
            metrics.events_in.labels("changes").inc()
            if event.value is None:
                continue  # a tombstone: compaction's delete, nothing to rank
            try:
                change = decode(event.value or b"", Change, settings.max_record_bytes)
            except InvalidRecord as exc:
                await dead_letter_event(event, exc.reason)
                continue
            await signals.send(key=b"changes", value=encode(ChangeSignal(change=change)))

    @app.agent(joined)
    async def correlate(stream: faust.StreamT) -> None:
        # Faust's cost is per record (~150 µs), so spans come in batch records and records
        # in batches of records. Every record is held (streams.join) until the requests it
        # touched were emitted and Kafka confirmed them: only then may Faust commit it.
        async for batch in stream.take_events(BATCH, within=BATCH_WAIT_S):
            now = time.time()
            touched: dict[bytes, Entry] = {}
            for event in batch:
                message = event.message
                topic = logical_of.get(message.topic, message.topic)
                metrics.events_in.labels(topic).inc()
                # Every record counts as read, also one that is dead-lettered below: otherwise
                # this partition never looks caught up and its silence fallback never fires.
                progress(event, now)
                message.incref()  # Faust acks the batch after this body; our hold outlives that
                held = join.record(message, message.partition)
                ts_ms = int((message.timestamp or now) * 1000)
                if topic == "reports-by-request":
                    take_report(event, held, now, ts_ms, touched)
                else:
                    take_spans(event, held, topic, now, ts_ms, touched)
                message.value = None  # decoded: a held record need not keep its bytes
                join.settle(held)
            for key, entry in touched.items():
                join.file(key, entry)
            outbox.poll()
            if now - last_flush[0] >= SIGNAL_FLUSH_S:
                flush_signals(now)

    def take_spans(event: faust.types.EventT, held: Held, topic: str, now: float, ts_ms: int,
                   touched: dict[bytes, Entry]) -> None:
        message = event.message
        partition = message.partition
        try:
            record = decode_spans(event.value or b"", settings.max_record_bytes)
        except InvalidRecord as exc:
            dead_letter(message, held, event.key, event.value, exc.reason)
            return
        for (position, reason), raw in zip(record.rejected, record.rejected_values):
            dead_letter(message, held, event.key, raw, rejected_reason(position, reason), position=position)
        metrics.spans_in.labels(topic).inc(len(record.spans))
        join.clock(partition, now).observe(span_topics[message.topic], ts_ms, now)  # type: ignore[arg-type]
        tp = (message.topic, partition)
        counting = offset_not_counted(tp, message.offset)
        entries = join.entries
        partitions = settings.partitions
        for position, span in record.positions():
            key = span.request_id.encode()
            if record.batch:
                known = entries.get(key)
                if (known.partition if known is not None else partition_of(key, partitions)) != partition:
                    dead_letter(message, held, event.key, encode(span), rejected_reason(
                        position, f"request_id {span.request_id!r} belongs to another partition than {partition}: "
                                  "a batch holds only spans of its partition (murmur2)"), position=position)
                    continue
            elif event.key != key:
                dead_letter(message, held, event.key, event.value,
                            f"record key {event.key!r} is not its request_id {span.request_id!r}: "
                            "spans must be keyed by request id")
                continue
            added = join.add_span(key, span, held, now, ts_ms)
            if added is None:
                duplicates.inc()
                continue
            entry, new = added
            touched[key] = entry
            if span.operation in watched_operations:
                forward_step(held, span, entry.state.drill)
            if counting:
                state = entry.state
                aggregator.saw(tp, span.start_us, state.drill)
                if new:
                    aggregator.request(span)
                if span.side == "client" or span.attributes:
                    aggregator.version(span, catalog)  # the canary comparison's counts
                if span.status == "error":
                    count_failure(state, span)

    def take_report(event: faust.types.EventT, held: Held, now: float, ts_ms: int,
                    touched: dict[bytes, Entry]) -> None:
        try:
            report = decode(event.value or b"", FaultReport, settings.max_record_bytes)
        except InvalidRecord as exc:
            dead_letter(event.message, held, event.key, event.value, exc.reason)
            return
        key = event.key or report.report_id.encode()
        entry = join.add_report(key, report, held, now, ts_ms)
        if entry is not None:
            touched[key] = entry

    def offset_not_counted(tp: tuple[str, int], offset: int) -> bool:
        done = counted_through.get(tp)
        return done is None or offset > done

    def count_failure(state: Pending, span: Span) -> None:
        """Count a request as failed in each dimension once, at its first evidence there."""
        new = count_new_failures(state.counted, failure_dimensions(span, catalog))
        if new:
            state.counted.extend(new)
            aggregator.failure(span, new)

    ingest_holds = Holds(lambda message: message.ack(app.consumer))  # type: ignore[attr-defined]
    rule = RequestIdRule(settings.request_id_attributes, settings.request_id_from_trace_id)

    @app.agent(otlp_in)
    async def ingest_otlp(stream: faust.StreamT) -> None:
        """OTLP exports as the OTel Collector's kafka exporter writes them (any key, any partition):
        normalized like the gateway's, re-keyed into batch records on ``server-spans``. An input
        record is acknowledged once every record its spans went into was confirmed."""
        async for batch in stream.take_events(BATCH, within=BATCH_WAIT_S):
            now = time.time()
            batcher = SpanBatcher(settings.partitions)
            holds: list[Held] = []
            latest_ms = 0
            for event in batch:
                message = event.message
                metrics.events_in.labels("otlp-spans").inc()
                progress(event, now)
                message.incref()
                held = ingest_holds.record(message, (message.topic, message.partition))
                try:
                    export = normalize_export_record(event.value or b"", rule, max_bytes=settings.max_record_bytes)
                except InvalidRecord as exc:
                    dead_letter(message, held, event.key, event.value, exc.reason, ingest_holds)
                else:
                    # one dead letter per bad span, numbered in the order found (its path is in the reason)
                    for number, reason in enumerate(export.rejected):
                        dead_letter(message, held, event.key, event.value, f"span {reason} (its neighbours were kept)",
                                    ingest_holds, position=number)
                    for span in export.spans:
                        batcher.add(span)
                    metrics.spans_in.labels("otlp-spans").inc(len(export.spans))
                    held.open += 1  # until the batch records below are confirmed
                    holds.append(held)
                latest_ms = max(latest_ms, int((message.timestamp or now) * 1000))
                message.value = None
                ingest_holds.settle(held)
            records = list(batcher.records())
            if not records:
                ingest_holds.release(holds)
                continue
            emission = Emission(partial(ingest_holds.release, holds), len(records))
            for _, key, value in records:
                outbox.send(name["server-spans"], key.encode(), value, emission.done, timestamp_ms=latest_ms)
                metrics.events_out.labels("server-spans").inc()
            outbox.poll()

    @app.on_partitions_revoked.connect
    async def drop_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        """Requests of partitions this worker lost go, unsent: their new owner re-reads them."""
        ingest_holds.lose((tp.topic, tp.partition) for tp in revoked if tp.topic == name["otlp-spans"])
        lost = {tp.partition for tp in revoked if tp.topic in joined_topics}
        for partition in lost:
            recalled.pop(partition, None)
            recalling.pop(partition, None)
        if lost:
            dropped = join.drop_partitions(lost)
            log.info("correlation: partitions %s moved on, %d requests in flight left to their next owner",
                     sorted(lost), dropped)

    @app.on_partitions_assigned.connect
    async def recall_assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
        """Read back what each newly owned partition emitted lately, without holding up the
        rebalance: until it is in, reports of that partition wait (see :func:`act`)."""
        now = time.time()
        since_ms = int((now - timing.retain_s) * 1000)
        limit = max(10_000, settings.correlation_max_retained // settings.partitions)
        loop = asyncio.get_running_loop()
        for partition in {tp.partition for tp in assigned if tp.topic in joined_topics}:
            if partition in recalled or partition in recalling:
                continue
            assignments[0] += 1
            recalling[partition] = mine = assignments[0]
            future = loop.run_in_executor(None, read_emitted, settings, partition, since_ms, limit)
            future.add_done_callback(partial(recalled_in, partition, mine, now))

    def recalled_in(partition: int, mine: int, at: float, future: Any) -> None:
        if recalling.get(partition) != mine:
            return  # lost (or given again) meanwhile
        del recalling[partition]
        recalled[partition] = (at, future.result() if future.exception() is None else Recalled(0))
        log.info("correlation: partition %d recalled %d requests emitted before it came here",
                 partition, len(recalled[partition][1]))

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
                    await dead_letter_event(event, exc.reason)
                    continue
                if isinstance(signal, SignalCount):
                    engine.on_count(signal)
                elif isinstance(signal, SignalClock):
                    out.extend(engine.on_clock(signal, now))
                elif isinstance(signal, MisuseCount):
                    out.extend(engine.on_misuse(signal))
                elif isinstance(signal, IncidentCommand):
                    out.extend(engine.on_command(signal))
                elif isinstance(signal, ChangeSignal):
                    out.extend(engine.on_change(signal.change))
                elif isinstance(signal, VersionCount):
                    engine.on_version(signal)
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
            if surge.kind == "canary":
                show_canary(surge)
            elif surge.phase == "end":
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

    def show_canary(surge: SurgeEvent) -> None:
        """A canary finding as gauges (the alert rule fires on them), gone when it ends."""
        a = surge.attributes
        target, version, base, cls = (str(a.get(k, "")) for k in ("target", "version", "baseline_version",
                                                                  "diagnosis_class"))
        drill = str(surge.drill).lower()
        worse = (target, version, base, cls, drill)
        shares = [(target, version, "new", cls, drill), (target, base, "baseline", cls, drill)]
        if surge.phase == "end":
            with_suppressed_keyerror(metrics.canary_worse.remove, *worse)
            for labels in shares:
                with_suppressed_keyerror(metrics.canary_failure_share.remove, *labels)
            return
        if surge.phase == "start":
            metrics.canary_findings.labels(target).inc()
            log.warning("canary: %s %s fails %s in %.1f %% of its requests against %.1f %% for %s (p=%s)", target,
                        version, cls, 100 * float(a.get("failure_share", 0)),
                        100 * float(a.get("baseline_failure_share", 0)), base, a.get("p_value"))
        metrics.canary_worse.labels(*worse).set(1)
        metrics.canary_failure_share.labels(*shares[0]).set(float(a.get("failure_share", 0)))
        metrics.canary_failure_share.labels(*shares[1]).set(float(a.get("baseline_failure_share", 0)))

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
        waiting = {f"{p}/{side}": len(q) for (p, side), q in join.waiting.items() if q}
        held = {p: join.holds.waiting(p) for p in sorted(join.holds.queues) if join.holds.waiting(p)}
        if waiting or held or recalling:
            log.debug("correlation: %d open, %d retained; waiting for a side %s; records unacknowledged per "
                      "partition %s; partitions being read back %s; caught up %s", join.open_requests,
                      len(join.retained), waiting, held, sorted(recalling),
                      {f"{t}/{p}": topic_caught_up((t, p)) for (t, p) in positions if t in span_topics})

    @app.timer(TICK_S)
    async def emit_due() -> None:
        now = time.time()
        for key, entry in join.due(now, caught_up):
            act(key, entry, now)
        join.cool(now)
        join.forget(now)
        for partition in [p for p, (at, _) in recalled.items() if at + timing.retain_s < now]:
            recalled[partition] = (recalled[partition][0], Recalled(0))  # all of it past retention now
        outbox.poll()
        metrics.correlation_in_memory.labels("open").set(join.open_requests)
        metrics.correlation_in_memory.labels("retained").set(len(join.retained))
        metrics.correlation_in_memory.labels("recalled").set(sum(len(r) for _, r in recalled.values()))

    def act(key: bytes, entry: Entry, now: float) -> None:
        """Send the request if it knows more than what was sent, and answer waiting reports;
        the records it holds are released once Kafka confirmed all of it."""
        state = entry.state
        if state.reports and entry.partition in recalling:
            join.later(key, now + TICK_S)  # what was emitted before is still being read back
            return
        news = len(state.spans) > state.emitted_version
        request = build_request(key.decode(), state, catalog, state.drill) if state.spans and (
            news or state.reports) else None
        outputs: list[tuple[str, bytes, bytes]] = []
        if request is not None and news:
            outputs.append((name["requests"], key, encode(request)))
            requests_written.inc()
            metrics.emit_delay.observe(now - state.first_seen_s)
        about = request
        if state.reports and entry.partition in recalled:
            # emitted before a restart or rebalance: the fuller of the two tells the report more
            before = recalled[entry.partition][1].get(key)
            if before is not None and (about is None or before.version > about.version):
                about = before
        for report in state.reports:
            diagnosed = diagnose_report(report, about, catalog, int(now * 1_000_000), is_drill(report.attributes))
            outputs.append((name["reports-diagnosed"], report.report_id.encode(), encode(diagnosed)))
            metrics.events_out.labels("reports-diagnosed").inc()
            whose = user_key(report.user_id, report.account_id)
            if whose and diagnosed.diagnosis.cls in explained:
                # it may follow from an earlier misuse of this user (streams/sequences.py)
                outputs.append((name["user-steps"], whose.encode(), encode(ReportStep(report=diagnosed))))
        mark_emitted(state, now)
        emission = join.sent(key, entry, len(outputs), now)
        for topic, out_key, value in outputs:
            outbox.send(topic, out_key, value, emission.done if emission else None)

    @app.on_before_shutdown.connect
    async def flush_outbox(sender: Any, **kwargs: Any) -> None:
        """What was sent reaches Kafka before the process ends (what does not is sent again)."""
        left = outbox.flush(10.0)
        if left:
            log.warning("correlation: %d outputs unconfirmed at shutdown; their inputs stay uncommitted", left)

    return app


_offsets_encoder = msgspec.json.Encoder()
_offsets_decoder = msgspec.json.Decoder(dict[str, int])


def decode_offsets(value: bytes | None) -> dict[str, int]:
    return _offsets_decoder.decode(value) if value else {}


def key_for_partition(prefix: bytes, partition: int, partitions: int) -> bytes:
    """A table key that murmur2 puts on ``partition``: the worker owning that input partition
    owns the table's matching changelog partition, and recovers it."""
    salt = 0
    while partition_of(prefix + b"-%d" % salt, partitions) != partition:
        salt += 1
    return prefix + b"-%d" % salt


def with_suppressed_keyerror(remove: Any, *labels: str) -> None:
    try:
        remove(*labels)
    except KeyError:  # never set in this process (e.g. before a restart)
        pass


def tune_gc_for_worker() -> None:
    """The worker holds some hundred thousand requests in memory, each a few containers the
    collector would scan again and again (measured: it doubled the cost of joining a span).
    The start-up heap is frozen out of its scans, and collections run less often; the
    records themselves are untracked (``gc=False`` in the contracts)."""
    gc.freeze()
    gc.set_threshold(100_000, 20, 10)


def run_worker(settings: Settings, catalog: Catalog, timing: Timing, policy: Policy, engine_config: EngineConfig,
               notifier: Notifier | None = None, loglevel: str = "info") -> None:
    """Run the worker until SIGINT/SIGTERM (blocking)."""
    from supportlens.topics import provision

    provision(settings)
    serve_metrics(settings, settings.worker_metrics_port, "worker")
    app = create_app(settings, catalog, timing, policy, engine_config, notifier)
    tune_gc_for_worker()
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    quiet_repeats("aiokafka")  # Faust's Kafka client: one line a minute per complaint while a broker is away
    worker.execute_from_commandline()
