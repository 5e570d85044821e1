"""Where the gateway's records go: confluent-kafka's producer behind an asyncio interface.

librdkafka runs delivery callbacks on whichever thread polls the producer. A background
thread polls; each callback hands its outcome to the event loop with
``loop.call_soon_threadsafe``, where it settles the future a handler awaits. A handler
answers only after Kafka acknowledged all of its records, so a 2xx means stored (at
least once: a client that retries after a 503 may store a record twice).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from supportlens.config import Settings
from supportlens.gateway.ingest import OutRecord
from supportlens.metrics import process_metrics

log = logging.getLogger(__name__)

# A client waits for its answer, so a record Kafka cannot take fails in seconds, not in
# librdkafka's default five minutes; OpenTelemetry SDKs give up on an export after 10 s.
DELIVERY_TIMEOUT_MS = 8_000
HEALTH_TTL_S = 5.0


class StorageUnavailable(Exception):
    """Kafka did not take a record; the client should retry later (HTTP 503)."""


class RecordSink(Protocol):
    """Stores records; tests replace the Kafka one with their own."""

    async def send_all(self, records: Sequence[OutRecord]) -> None:
        """Return once every record is stored; raise :class:`StorageUnavailable` if one was not."""

    async def reachable(self) -> bool:
        """Whether the store answers (cheap: may be a few seconds old)."""


class KafkaRecordSink:
    """Produces to the logical topics of :class:`OutRecord` (``client-spans`` → ``<prefix>client-spans``)."""

    def __init__(self, settings: Settings, poll_interval_s: float = 0.1) -> None:
        self._settings = settings
        self._producer = Producer(
            settings.producer_config(
                **{"enable.idempotence": True, "linger.ms": 5, "message.timeout.ms": DELIVERY_TIMEOUT_MS}
            )
        )
        self._poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="gateway-producer-poll", daemon=True)
        self._health: tuple[float, bool] | None = None
        self._health_lock = asyncio.Lock()

    def start(self) -> None:
        self._poller.start()

    async def send_all(self, records: Sequence[OutRecord]) -> None:
        loop = asyncio.get_running_loop()
        outcomes = await asyncio.gather(*(self._produce(loop, record) for record in records), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        metrics = process_metrics()
        for topic, count in Counter(record.topic for record in records).items():
            metrics.events_out.labels(topic).inc(count)
        if records:
            metrics.last_progress.labels("gateway").set(time.time())

    def _produce(self, loop: asyncio.AbstractEventLoop, record: OutRecord) -> asyncio.Future[None]:
        """A future settled by the record's delivery report; already failed if librdkafka refused it."""
        future: asyncio.Future[None] = loop.create_future()
        topic = self._settings.topic(record.topic)

        def delivered(error: KafkaError | None, _message: Message) -> None:
            try:
                loop.call_soon_threadsafe(_settle, future, topic, error)
            except RuntimeError:  # the loop is closed: nobody waits for this answer any more
                pass

        # a batch of spans names its partition: where murmur2 puts every request id in it
        where = {} if record.partition is None else {"partition": record.partition}
        try:
            self._producer.produce(topic, value=record.value, key=record.key.encode(), on_delivery=delivered, **where)
        except BufferError:
            future.set_exception(StorageUnavailable("the gateway's queue to Kafka is full"))
        except KafkaException as exc:
            future.set_exception(StorageUnavailable(f"Kafka refused a record for {topic}: {exc.args[0].str()}"))
        return future

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(self._poll_interval_s)

    async def reachable(self) -> bool:
        async with self._health_lock:
            if self._health is None or time.monotonic() - self._health[0] > HEALTH_TTL_S:
                ok = await asyncio.get_running_loop().run_in_executor(None, self._metadata_answers)
                self._health = (time.monotonic(), ok)
            return self._health[1]

    def _metadata_answers(self) -> bool:
        try:
            self._producer.list_topics(timeout=2.0)
            return True
        except KafkaException:
            return False

    async def close(self, timeout_s: float = 10.0) -> int:
        """Stop polling and flush; returns how many records were still undelivered (0 is success)."""
        loop = asyncio.get_running_loop()
        self._stop.set()
        if self._poller.is_alive():
            await loop.run_in_executor(None, self._poller.join)
        left = await loop.run_in_executor(None, self._producer.flush, timeout_s)
        # librdkafka's threads and sockets go now, not whenever the garbage collector
        # breaks the application's reference cycles; the sink is not used after close
        del self._producer
        if left:
            log.error("%d records were not delivered to Kafka within %.0f s of shutdown", left, timeout_s)
        return left


def _settle(future: asyncio.Future[None], topic: str, error: KafkaError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(StorageUnavailable(f"Kafka did not store a record on {topic}: {error.str()}"))
