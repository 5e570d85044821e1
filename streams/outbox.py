"""What the worker writes, through confluent-kafka, with a callback once Kafka has it.

Faust's own producer costs some 50 µs of Python a record; librdkafka takes a record in
about one. The worker writes thousands of requests a second, so its outputs go here, and
each output's ``done`` tells :mod:`streams.join` that the input records it covers may be
acknowledged: an input offset is committed only after its outputs were stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial

from confluent_kafka import KafkaError, Message, Producer

from supportlens.config import Settings
from supportlens.metrics import Metrics

log = logging.getLogger(__name__)


class Outbox:
    """Idempotent, murmur2-partitioned writes that never time out on their own: while Kafka
    is away they wait, and the inputs they cover stay uncommitted."""

    def __init__(self, settings: Settings, metrics: Metrics, logical_of: Mapping[str, str]) -> None:
        self._producer = Producer(settings.producer_config(**{
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 0,  # never give up: an input is committed only after its output
            "queue.buffering.max.messages": 1_000_000,
            "message.max.bytes": max(settings.max_record_bytes + 65536, 1_000_000),
        }))
        self._metrics = metrics
        self._logical_of = logical_of

    def send(self, topic: str, key: bytes | None, value: bytes | None, done: Callable[[], None] | None = None,
             headers: Mapping[str, bytes] | None = None, timestamp_ms: int = 0) -> None:
        """Queue one record (``topic`` is the full name); ``done`` runs (from :meth:`poll`) once
        Kafka acknowledged it. Waits, serving callbacks, while librdkafka's queue is full."""
        callback = partial(self._delivered, done) if done is not None else self._delivered_quietly
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=callback,
                                       headers=dict(headers) if headers else None, timestamp=timestamp_ms)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _delivered(self, done: Callable[[], None], error: KafkaError | None, message: Message) -> None:
        if error is None:
            done()
        else:
            self._refused(error, message)

    def _delivered_quietly(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._refused(error, message)

    def _refused(self, error: KafkaError, message: Message) -> None:
        topic = message.topic() or "?"
        self._metrics.outbox_failures.labels(self._logical_of.get(topic, topic)).inc()
        log.error("Kafka refused an output on %s for good (%s); its input stays uncommitted, so the worker "
                  "sends it again after a restart", topic, error.str())

    def poll(self) -> None:
        """Serve the delivery reports that are in (never blocks)."""
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every output; returns how many are still unconfirmed."""
        return self._producer.flush(timeout_s)
