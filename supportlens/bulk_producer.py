"""Bulk writes to Kafka for the commands that send many records at once: ``simulate``,
``drill`` and ``accounts import``.

Idempotent (a retry never duplicates or reorders a partition's records), Kafka's Java
partitioner (see :meth:`Settings.producer_config`), a local queue that waits instead of
failing when it is full, and an honest end: :meth:`finish` raises a :class:`UserError`
unless the broker acknowledged every record.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from supportlens.config import Settings
from supportlens.errors import UserError

MAX_FAILURES_KEPT = 20


class BulkProducer:
    def __init__(self, settings: Settings, timeout_s: float = 60.0, **overrides: Any) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.failures: list[str] = []
        self._producer = Producer(settings.producer_config(**{
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 500_000,
            "message.max.bytes": max(settings.max_record_bytes + 65536, 1_000_000),
            "message.timeout.ms": int(timeout_s * 1000),
            **overrides,
        }))

    def _delivered(self, err: KafkaError | None, _message: object) -> None:
        if err is not None and len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(err.str())

    def send(self, topic: str, key: str, value: bytes, ts_us: int | None = None, partition: int | None = None) -> None:
        """Queue one record (``topic`` is the full name); waits while the local queue is full.

        ``partition`` None leaves it to the partitioner (murmur2 of ``key``); a batch of spans
        names the partition all its request ids belong to. Raises :class:`UserError` when
        librdkafka refuses the record outright."""
        extra: dict[str, int] = {} if ts_us is None else {"timestamp": ts_us // 1000}
        if partition is not None:
            extra["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._delivered, **extra)
                return
            except BufferError:  # local queue full: let librdkafka drain, then retry
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise UserError(f"Kafka at {self.settings.kafka_bootstrap} refused a record for {topic} "
                                f"({exc.args[0].str() if exc.args else exc})",
                                hint="check the broker (`deploy/local/kafka.sh status`)") from None

    def poll(self) -> None:
        """Serve the delivery reports that are in (never blocks)."""
        self._producer.poll(0)

    def wait(self, seconds: float) -> None:
        """Pause pacing for up to ``seconds`` while librdkafka keeps sending (returns early when
        everything is sent)."""
        self._producer.flush(seconds)

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def finish(self, incomplete: str, hint: str) -> None:
        """Wait until every record is acknowledged; raise :class:`UserError` saying ``incomplete``
        (what it means for the user) when one was not."""
        remaining = self._producer.flush(self.timeout_s)
        if self.failures or remaining:
            problem = self.failures[0] if self.failures else \
                f"{remaining} records still unsent after {self.timeout_s:.0f} s"
            raise UserError(f"Kafka did not accept every record ({problem}); {incomplete}", hint=hint)
