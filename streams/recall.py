"""Requests emitted before this worker owned their partition, read back from ``requests``.

The join keeps an emitted request only in this process's memory (:mod:`streams.join`),
and its span records are committed once it was sent. A fault report comes seconds or
minutes after the failed call: when a restart or a rebalance came in between, the worker
that gets the report no longer has the request, and would diagnose the report as if its
request never reached us. ``requests`` is already the record of every emission, keyed
and partitioned like the joined topics, so the worker reads back the last ``retain_s``
of each partition it is given — the same window it keeps requests in memory — and a
report finds its request there. It costs no write at all, and a read per assignment.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict

import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition

from supportlens.config import Settings
from supportlens.contracts import CorrelatedRequest, InvalidRecord, decode

log = logging.getLogger(__name__)


class _Version(msgspec.Struct):
    version: int = 1


_version = msgspec.json.Decoder(_Version)


class Recalled:
    """The highest version emitted per request of one partition, as the record was written
    (decoded only when a report asks), at most ``limit`` of them, the newest kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._records: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()

    def add(self, key: bytes, value: bytes) -> None:
        try:
            version = _version.decode(value).version
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # not ours to judge here: the sink dead-letters what it cannot read
        known = self._records.pop(key, None)
        if known is not None and known[0] > version:
            version, value = known
        self._records[key] = (version, value)
        if len(self._records) > self.limit:
            self._records.popitem(last=False)

    def get(self, key: bytes) -> CorrelatedRequest | None:
        known = self._records.get(key)
        if known is None:
            return None
        try:
            return decode(known[1], CorrelatedRequest)
        except InvalidRecord:
            return None

    def __len__(self) -> int:
        return len(self._records)


def read_emitted(settings: Settings, partition: int, since_ms: int, limit: int, timeout_s: float = 30.0) -> Recalled:
    """Partition ``partition`` of ``requests`` from the first record at or after ``since_ms``
    up to its end when called; joins no group and commits nothing."""
    recalled = Recalled(limit)
    topic = settings.topic("requests")
    consumer = Consumer(settings.kafka_config(**{
        "group.id": f"supportlens-recall-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }))
    try:
        start = consumer.offsets_for_times([TopicPartition(topic, partition, since_ms)], timeout=timeout_s)[0]
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
        first = start.offset if start.offset >= 0 else high  # -1: nothing as recent as that
        if first >= high:
            return recalled
        consumer.assign([TopicPartition(topic, partition, max(first, low))])
        position, deadline = first, time.monotonic() + 4 * timeout_s
        while position < high and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=1.0):
                if message.error() is not None:
                    continue
                position = message.offset() + 1
                key, value = message.key(), message.value()
                if key is not None and value is not None:
                    recalled.add(key, value)
        return recalled
    except KafkaException as exc:
        # what could be read: a report about a request not recalled says what its own client log says
        log.warning("correlation: could not read back partition %d of %s (%s); %d requests recalled",
                    partition, topic, exc, len(recalled))
        return recalled
    finally:
        consumer.close()
