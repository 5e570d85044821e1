"""What became of a fault report: the diagnoses on ``reports-diagnosed``, kept for lookups.

:class:`ReportBook` is plain memory, bounded (least recently used entries go first) and
used from the event loop only. :class:`DiagnosedReportFollower` reads the topic on its
own thread (every partition: any gateway may be asked about any report), starting an
hour back so a restarted gateway still answers recent reports, and hands each batch to
the loop. A record that does not decode is logged with its position and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, TypeVar

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from supportlens import contracts
from supportlens.config import Settings
from supportlens.contracts import DiagnosedReport, InvalidRecord
from supportlens.errors import UserError
from supportlens.topic_reader import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

DIAGNOSED_TOPIC = "reports-diagnosed"
DEFAULT_CAPACITY = 100_000
LOOKBACK_S = 3600.0
START_TIMEOUT_S = 10.0

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class ReportBook:
    """Reports this gateway accepted, and the diagnoses it has seen (of any gateway's reports)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._accepted: _Lru[str, bool] = _Lru(capacity)
        self._diagnosed: _Lru[str, DiagnosedReport] = _Lru(capacity)

    def accepted(self, report_id: str) -> None:
        self._accepted.put(report_id, True)

    def add_diagnoses(self, reports: Iterable[DiagnosedReport]) -> None:
        """Keep the latest diagnosis per report; drills replay old reports and are not answers to anyone."""
        for report in reports:
            if report.drill:
                continue
            known = self._diagnosed.get(report.report_id)
            if known is None or report.diagnosed_at_us >= known.diagnosed_at_us:
                self._diagnosed.put(report.report_id, report)

    def lookup(self, report_id: str) -> DiagnosedReport | Literal["pending"] | None:
        """The diagnosis; ``"pending"`` for a report accepted here and not diagnosed yet; else None."""
        return self._diagnosed.get(report_id) or ("pending" if self._accepted.get(report_id) else None)


def diagnosis_view(report: DiagnosedReport) -> dict[str, Any]:
    """The answer a reporter sees: the class and the explanation in their locale, nothing internal."""
    return {
        "report_id": report.report_id,
        "status": "diagnosed",
        "diagnosis": report.diagnosis.cls,
        "title": report.title,
        "explanation": report.explanation,
        "action": report.action,
        "doc_url": report.doc_url,
        "locale": report.locale,
    }


class DiagnosedReportFollower:
    """Feeds ``reports-diagnosed`` into a callback on the event loop, from an hour back onward."""

    def __init__(
        self,
        settings: Settings,
        on_reports: Callable[[list[DiagnosedReport]], None],
        lookback_s: float = LOOKBACK_S,
    ) -> None:
        self._settings = settings
        self._on_reports = on_reports
        self._lookback_s = lookback_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.invalid = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Assign every partition at its offset of an hour ago, then follow on a thread.

        Raises :class:`UserError` when the positions cannot be read within ``START_TIMEOUT_S``.
        """
        consumer = Consumer(
            self._settings.kafka_config(
                **{
                    # assigned partitions, no group membership: every gateway reads everything
                    "group.id": f"supportlens-gateway-{uuid.uuid4()}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "latest",
                    "enable.partition.eof": False,
                }
            )
        )
        try:
            consumer.assign(self._positions(consumer))
        except BaseException:
            consumer.close()
            raise
        self._thread = threading.Thread(
            target=self._follow, args=(consumer, loop), name="gateway-diagnosed-reports", daemon=True
        )
        self._thread.start()

    def _positions(self, consumer: Consumer) -> list[TopicPartition]:
        topic = self._settings.topic(DIAGNOSED_TOPIC)
        since_ms = int((time.time() - self._lookback_s) * 1000)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                partitions = consumer.list_topics(topic, timeout=START_TIMEOUT_S).topics[topic].partitions
                wanted = [TopicPartition(topic, p, since_ms) for p in partitions]
                found = consumer.offsets_for_times(wanted, timeout=START_TIMEOUT_S)
                break
            except KafkaException as exc:
                error = exc.args[0]
                # a new topic's or a restarted broker's leaders take a moment to settle
                if not (error.retriable() or error.code() in TRANSIENT_ERRORS) or time.monotonic() > deadline:
                    raise UserError(f"cannot read the positions of {topic} in Kafka: {error.str()}") from None
                time.sleep(0.2)
        # -1: nothing on that partition since then, so start at its end
        return [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found]

    def _follow(self, consumer: Consumer, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self._stop.is_set():
                reports = []
                for message in consumer.consume(num_messages=500, timeout=0.2):
                    if message.error() is not None:
                        log.warning("reading %s: %s", message.topic(), message.error().str())
                        continue
                    try:
                        reports.append(
                            contracts.decode(message.value() or b"", DiagnosedReport, self._settings.max_record_bytes)
                        )
                    except InvalidRecord as exc:
                        self.invalid += 1
                        log.warning(
                            "skipped %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), exc
                        )
                if reports:
                    loop.call_soon_threadsafe(self._on_reports, reports)
        except (KafkaException, RuntimeError):  # RuntimeError: the loop closed under us during shutdown
            if not self._stop.is_set():
                log.exception("following %s stopped", self._settings.topic(DIAGNOSED_TOPIC))
        finally:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
