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

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from sinks.clickhouse_rows import MAPPINGS, RecordMeta, to_row
from streams.dead_letters import dead_letter_headers
from supportlens.config import Settings
from supportlens.contracts import InvalidRecord
from supportlens.metrics import Metrics
from supportlens.topic_reader import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass
class TableBatch:
    """Rows for one table, and the highest offset they cover per topic-partition."""

    rows: list[list[Any]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    firsts: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    started: float = 0.0
    failures: int = 0
    retry_at: float = 0.0

    def add(self, topic: str, partition: int, offset: int, row: list[Any] | None, now: float) -> None:
        if not self.records:
            self.started = now
        if row is not None:
            self.rows.append(row)
        self.offsets[(topic, partition)] = max(offset, self.offsets.get((topic, partition), -1))
        self.firsts.setdefault((topic, partition), offset)
        self.records += 1


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
        self.consumer = Consumer(settings.kafka_config(**{
            "group.id": f"{settings.topic_prefix}sink",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # an insert may stall while ClickHouse is down; the consumer keeps polling, but be generous
            "max.poll.interval.ms": 600_000,
        }))
        self.producer = Producer(settings.producer_config(**{"linger.ms": 20}))

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.consumer.subscribe(list(self.logical), on_revoke=self._on_revoke)
        log.info("sink: reading %s", ", ".join(sorted(self.logical)))
        try:
            while not self.stop.is_set():
                messages = self.consumer.consume(num_messages=5000, timeout=0.2)
                now = time.monotonic()
                for message in messages:
                    self._take(message, now)
                self._flush(force=False)
        finally:
            self._flush(force=True, last=True)
            self.consumer.close()
            self.producer.flush(10)

    def _take(self, message: Message, now: float) -> None:
        error = message.error()
        if error is not None:
            if error.code() in TRANSIENT_ERRORS or error.retriable():
                log.debug("sink: transient consumer error: %s", error)
            else:
                log.warning("sink: consumer error: %s", error)
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        logical = self.logical[topic]
        mapping = MAPPINGS[logical]
        self.metrics.events_in.labels(logical).inc()
        meta = RecordMeta(partition, offset, message.timestamp()[1], message.key(), message.headers() or ())
        try:
            row: list[Any] | None = to_row(logical, message.value(), meta, self.settings.max_record_bytes)
        except InvalidRecord as exc:
            row = None
            self._dead_letter(message, logical, exc.reason)
        self.batches.setdefault(mapping.table, TableBatch()).add(topic, partition, offset, row, now)

    def _dead_letter(self, message: Message, logical: str, reason: str) -> None:
        if logical == "dlq":
            # never loop a dead letter back into its own topic; it is counted and logged
            log.warning("sink: unreadable dead letter at dlq/%d@%d: %s", message.partition(), message.offset(), reason)
        else:
            self.producer.produce(
                self.settings.topic("dlq"), value=message.value(), key=message.key(),
                headers=dead_letter_headers(reason, message.topic(), message.partition(), message.offset()),
            )
        self.metrics.dead_letters.labels(logical).inc()

    # -- writing ------------------------------------------------------------------

    def _flush(self, *, force: bool, last: bool = False, only: set[tuple[str, int]] | None = None) -> None:
        now = time.monotonic()
        held = 0
        for table, batch in list(self.batches.items()):
            if only is not None and not (set(batch.offsets) & only):
                held += batch.records
                continue
            due = (
                batch.records >= self.settings.sink_batch_rows
                or now - batch.started >= self.settings.sink_flush_s
                or force
            )
            if not batch.records or not due or (batch.failures and now < batch.retry_at and not last):
                held += batch.records
                continue
            if self._write(table, batch):
                del self.batches[table]
            else:
                held += batch.records
        self.metrics.sink_held_records.set(held)

    def _write(self, table: str, batch: TableBatch) -> bool:
        columns = MAPPINGS_BY_TABLE[table]
        started = time.perf_counter()
        try:
            if batch.rows:
                self.client.insert(table, batch.rows, column_names=columns)
        except Exception as exc:  # noqa: BLE001 - any refusal: keep the batch, back off, retry
            batch.failures += 1
            delay = backoff_delay(batch.failures)
            batch.retry_at = time.monotonic() + delay
            self.metrics.sink_write_failures.labels(table).inc()
            self._pause(table, batch)
            log.warning(
                "sink: ClickHouse did not take %d rows for %s (%s); holding %d records uncommitted, "
                "retry %d in %.1f s", len(batch.rows), table, _first_line(exc), batch.records, batch.failures, delay,
            )
            return False
        self.metrics.sink_write_seconds.labels(table).observe(time.perf_counter() - started)
        self.metrics.sink_rows.labels(table).inc(len(batch.rows))
        self.rows_written += len(batch.rows)
        # Dead letters of this batch must be on their topic before the records are committed.
        self.producer.flush(30)
        self._commit(batch)
        self._resume(table)
        if batch.failures:
            log.info("sink: ClickHouse took %s again after %d failed attempts", table, batch.failures)
        return True

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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


MAPPINGS_BY_TABLE: dict[str, tuple[str, ...]] = {m.table: m.columns for m in MAPPINGS.values()}


def run_sink(settings: Settings, client: Client, metrics: Metrics, stop: threading.Event) -> ClickHouseSink:
    """Run a sink until ``stop`` is set; returns it (for its counters)."""
    sink = ClickHouseSink(settings, client, metrics, stop)
    sink.run()
    return sink

