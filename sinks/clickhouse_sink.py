"""The ClickHouse sink: topics → batched inserts → offsets committed after the insert.

Guarantee: every record that reached a topic ends up as a row (or as a dead letter),
and every row is visible once. Delivery from Kafka is at-least-once — offsets are
committed only after ClickHouse accepted the batch, so a crash re-reads the records
after the last commit — and each table's ReplacingMergeTree key makes a re-delivered
row the same row. Queries read ``FINAL``, so a duplicate not yet merged away is never
seen twice.

When ClickHouse refuses or is unreachable, the batch is kept, its partitions are paused
(so memory stays bounded), nothing is committed, and the insert is retried with
exponential backoff — logged and counted in ``supportlens_sink_write_failures_total``.
"""

from __future__ import annotations

import gc
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from sinks.clickhouse_rows import (
    MAPPINGS,
    SPANS,
    RecordMeta,
    TableMapping,
    spans_landing_json,
    to_landing_json,
    to_row,
)
from streams.dead_letters import dead_letter_headers
from supportlens.config import Settings
from supportlens.contracts import InvalidRecord
from supportlens.metrics import Metrics
from supportlens.topic_reader import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

_NO_META = RecordMeta(0, 0, 0)
BACKOFF_FIRST_S = 0.5
MAX_BATCHES_WAITING = 4  # a table's batch grows to this many times sink_batch_rows while an insert runs
BACKOFF_MAX_S = 30.0
LAG_EVERY_S = 5.0


@dataclass
class TableBatch:
    """Rows for one table, and the highest offset they cover per topic-partition."""

    rows: list[Any] = field(default_factory=list)  # row lists, or JSON lines for a landing table
    row_count: int = 0  # rows in ``rows``: an item of a span batch's record holds one line per span
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    firsts: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    started: float = 0.0
    failures: int = 0
    retry_at: float = 0.0

    def add(self, topic: str, partition: int, offset: int, row: Any, now: float, count: int = 1) -> None:
        if not self.records:
            self.started = now
        if row is not None:
            self.rows.append(row)
            self.row_count += count
        self.offsets[(topic, partition)] = max(offset, self.offsets.get((topic, partition), -1))
        self.firsts.setdefault((topic, partition), offset)
        self.records += 1

    @property
    def size(self) -> int:
        """What counts against ``sink_batch_rows``: rows, or records where most were dead letters."""
        return max(self.records, self.row_count)

    def absorb(self, later: "TableBatch") -> None:
        """Append a batch read after this one (same table)."""
        self.rows.extend(later.rows)
        self.row_count += later.row_count
        for key, offset in later.offsets.items():
            self.offsets[key] = max(offset, self.offsets.get(key, -1))
        for key, first in later.firsts.items():
            self.firsts.setdefault(key, first)
        self.records += later.records


def backoff_delay(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter: up to 0.5 s, 1 s, 2 s … capped at 30 s."""
    return rng() * min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1)) + 0.05


class ClickHouseSink:
    """One consumer in group ``<prefix>sink`` writing every mapped topic to its table.

    Run :meth:`run` in a thread or as the main loop; set ``stop`` to end it after a
    last flush. Several sinks in one group share the partitions (server DSN only: the
    embedded store belongs to one process).
    """

    def __init__(self, settings: Settings, client: Client, metrics: Metrics, stop: threading.Event) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.stop = stop
        self.logical = {settings.topic(name): name for name in MAPPINGS}
        self.batches: dict[str, TableBatch] = {}
        self.paused: dict[str, list[TopicPartition]] = {}
        self.rows_written = 0
        self.jobs: queue.Queue[tuple[str, TableBatch] | None] = queue.Queue(maxsize=1)
        self.results: queue.Queue[tuple[str, TableBatch, Exception | None]] = queue.Queue()
        self.in_flight: tuple[str, int] | None = None  # (table, records) of the insert on the writer thread
        self.lag_measured = 0.0
        self.consumer = Consumer(settings.kafka_config(**{
            "group.id": f"{settings.topic_prefix}sink",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "session.timeout.ms": int(settings.sink_session_timeout_s * 1000),
            # an insert may stall while ClickHouse is down; the consumer keeps polling, but be generous
            "max.poll.interval.ms": 600_000,
            # bigger fetches: the sink drains backlogs, and at the default 1 MB per partition the
            # loop waited on fetches for a third of its time (make bench)
            "max.partition.fetch.bytes": 8_388_608,
            "fetch.wait.max.ms": 100,
        }))
        self.producer = Producer(settings.producer_config(**{"linger.ms": 20}))

    # -- the loop -----------------------------------------------------------------

    def _measure_lag(self, now: float) -> None:
        """Records on the broker not yet read, per topic, from the cached high watermarks (no request)."""
        self.lag_measured = now
        lag: Counter[str] = Counter()
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    lag[self.logical.get(tp.topic, tp.topic)] += max(0, high - tp.offset)
        except KafkaException:  # a rebalance in progress: measure next time
            return
        for topic, records in lag.items():
            self.metrics.consumer_lag.labels("sink", topic).set(records)

    def run(self) -> None:
        self.consumer.subscribe(list(self.logical), on_revoke=self._on_revoke)
        log.info("sink: reading %s", ", ".join(sorted(self.logical)))
        writer = threading.Thread(target=self._write_loop, name="clickhouse-writer", daemon=True)
        writer.start()
        try:
            while not self.stop.is_set():
                messages = self.consumer.consume(num_messages=5000, timeout=0.2)
                now = time.monotonic()
                read: Counter[str] = Counter()
                for message in messages:
                    logical = self._take(message, now)
                    if logical:
                        read[logical] += 1
                for logical, count in read.items():  # per poll, not per record: it is the hot loop
                    self.metrics.events_in.labels(logical).inc(count)
                if messages:
                    self.metrics.last_progress.labels("sink").set(time.time())
                if now - self.lag_measured >= LAG_EVERY_S:
                    self._measure_lag(now)
                self._flush(force=False)
        finally:
            self._flush(force=True, last=True)
            self.jobs.put(None)
            writer.join(30)
            self.consumer.close()
            self.producer.flush(10)

    def _take(self, message: Message, now: float) -> str | None:
        """Add one record's row to its table's batch; returns its logical topic (None for an error)."""
        error = message.error()
        if error is not None:
            if error.code() in TRANSIENT_ERRORS or error.retriable():
                log.debug("sink: transient consumer error: %s", error)
            else:
                log.warning("sink: consumer error: %s", error)
            return None
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        logical = self.logical[topic]
        # Only dead letters read their Kafka metadata; other records skip building it.
        meta = (RecordMeta(partition, offset, message.timestamp()[1], message.key(), message.headers() or ())
                if logical == "dlq" else _NO_META)
        mapping = MAPPINGS[logical]
        count = 1
        try:
            if mapping is SPANS:  # one span or a batch: good spans land, a bad one is dead-lettered alone
                spans = spans_landing_json(message.value(), self.settings.max_record_bytes)
                row: Any = spans.lines if spans.count else None
                count = spans.count
                for position, reason, value in spans.rejected:
                    self._dead_letter(message, logical, reason, value, position)
            elif mapping.landing:
                row = to_landing_json(logical, message.value(), self.settings.max_record_bytes)
            else:
                row = to_row(logical, message.value(), meta, self.settings.max_record_bytes)
        except InvalidRecord as exc:
            row = None
            self._dead_letter(message, logical, exc.reason)
        table = mapping.table
        batch = self.batches.get(table)
        if batch is None:
            batch = self.batches[table] = TableBatch()
        batch.add(topic, partition, offset, row, now, count)
        return logical

    def _dead_letter(self, message: Message, logical: str, reason: str, value: bytes | None = None,
                     position: int | None = None) -> None:
        """``value`` is the bad part when only a part is bad (a span of a batch); else the whole record."""
        if logical == "dlq":
            # never loop a dead letter back into its own topic; it is counted and logged
            log.warning("sink: unreadable dead letter at dlq/%d@%d: %s", message.partition(), message.offset(), reason)
        else:
            self.producer.produce(
                self.settings.topic("dlq"), value=message.value() if value is None else value, key=message.key(),
                headers=dead_letter_headers(reason, message.topic(), message.partition(), message.offset(), position),
            )
        self.metrics.dead_letters.labels(logical).inc()

    # -- writing ------------------------------------------------------------------
    # One insert at a time runs on the writer thread while this thread reads and decodes the
    # next records (ClickHouse parses and writes without holding the GIL). Its outcome comes
    # back here, where offsets are committed: the consumer is used from this thread only.

    def _flush(self, *, force: bool, last: bool = False, only: set[tuple[str, int]] | None = None) -> None:
        self._collect(block=force)
        now = time.monotonic()
        for table, batch in list(self.batches.items()):
            if only is not None and not (set(batch.offsets) & only):
                continue
            due = (
                batch.size >= self.settings.sink_batch_rows
                or now - batch.started >= self.settings.sink_flush_s
                or force
            )
            if not batch.records or not due or (batch.failures and now < batch.retry_at and not last):
                continue
            if force:  # shutdown or a rebalance: write here and now, in order
                del self.batches[table]
                self._finish(table, batch, self._insert(table, batch))
                continue
            if self.in_flight is not None and batch.size >= MAX_BATCHES_WAITING * self.settings.sink_batch_rows:
                self._collect(block=True)  # ClickHouse is slower than Kafka: wait rather than grow without bound
                waiting = self.batches.get(table)
                if waiting is None or waiting.failures:  # the insert that ended failed and took it in: back off
                    continue
            if self.in_flight is None:
                del self.batches[table]
                self.in_flight = (table, batch.records)
                self.jobs.put((table, batch))
        in_flight = self.in_flight[1] if self.in_flight else 0
        self.metrics.sink_held_records.set(sum(b.records for b in self.batches.values()) + in_flight)

    def _collect(self, *, block: bool) -> None:
        """Take the outcome of the insert in flight, if it is done (or wait for it)."""
        if self.in_flight is None:
            return
        try:
            table, batch, error = self.results.get(block=block)
        except queue.Empty:
            return
        self.in_flight = None
        self._finish(table, batch, error)

    def _write_loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            table, batch = job
            self.results.put((table, batch, self._insert(table, batch)))

    def _insert(self, table: str, batch: TableBatch) -> Exception | None:
        mapping = MAPPINGS_BY_TABLE[table]
        started = time.perf_counter()
        try:
            if batch.rows and mapping.landing:
                self.client.raw_insert(mapping.landing, insert_block=b"\n".join(batch.rows), fmt="JSONEachRow")
            elif batch.rows:
                self.client.insert(table, batch.rows, column_names=mapping.columns)
        except Exception as exc:  # noqa: BLE001 - any refusal: the batch is kept and retried
            return exc
        self.metrics.sink_write_seconds.labels(table).observe(time.perf_counter() - started)
        return None

    def _finish(self, table: str, batch: TableBatch, error: Exception | None) -> None:
        if error is not None:
            # Back in front of what was read meanwhile: nothing after it may be committed before it.
            later = self.batches.get(table)
            if later is not None:
                batch.absorb(later)
            self.batches[table] = batch
            batch.failures += 1
            delay = backoff_delay(batch.failures)
            batch.retry_at = time.monotonic() + delay
            self.metrics.sink_write_failures.labels(table).inc()
            self._pause(table, batch)
            log.warning(
                "sink: ClickHouse did not take %d rows for %s (%s); holding %d records uncommitted, "
                "retry %d in %.1f s", batch.row_count, table, _first_line(error), batch.records, batch.failures, delay,
            )
            return
        self.metrics.sink_rows.labels(table).inc(batch.row_count)
        self.rows_written += batch.row_count
        # Dead letters of this batch must be on their topic before the records are committed.
        self.producer.flush(30)
        self._commit(batch)
        self._resume(table)
        if batch.failures:
            log.info("sink: ClickHouse took %s again after %d failed attempts", table, batch.failures)

    def _commit(self, batch: TableBatch) -> None:
        offsets = [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in batch.offsets.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - rows are in; a re-delivery is deduplicated
            log.info("sink: commit after insert failed (%s); the records will be read again and deduplicated",
                     _first_line(exc))

    def _pause(self, table: str, batch: TableBatch) -> None:
        partitions = [TopicPartition(topic, partition) for topic, partition in batch.offsets]
        try:
            self.consumer.pause(partitions)
            self.paused[table] = partitions
        except Exception as exc:  # noqa: BLE001 - a revoked partition cannot be paused; nothing to hold then
            log.debug("sink: pause failed: %s", exc)

    def _resume(self, table: str) -> None:
        partitions = self.paused.pop(table, None)
        if partitions:
            try:
                self.consumer.resume(partitions)
            except Exception as exc:  # noqa: BLE001 - revoked meanwhile; the new owner reads them
                log.debug("sink: resume failed: %s", exc)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Write what was read from the partitions we lose; what cannot be written is dropped
        uncommitted, and their next owner reads it again."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._flush(force=True, last=True, only=revoked)
        for table, batch in list(self.batches.items()):
            if set(batch.offsets) & revoked:
                del self.batches[table]
                self._resume(table)
                # The batch also held records of partitions we keep: rewind those, or they would be skipped.
                for (topic, partition), first in batch.firsts.items():
                    if (topic, partition) not in revoked:
                        self.consumer.seek(TopicPartition(topic, partition, first))


def tune_gc_for_sink() -> None:
    """For a process that runs a sink: it makes and drops millions of short-lived rows, so the
    start-up heap is frozen out of the collector's scans and young collections run less often
    (measured: a quarter of the sink's time went to the collector with Python's defaults)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


MAPPINGS_BY_TABLE: dict[str, TableMapping] = {m.table: m for m in MAPPINGS.values()}
