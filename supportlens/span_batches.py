"""Span records on the span topics: one span, or a batch of spans that share a partition.

A Python stream processor pays per Kafka record, not per span, so producers pack the
spans bound for one partition into one record: a JSON array of spans. A record that is a
JSON object is one span, as older producers write it; both kinds mix on one topic.

Co-partitioning stays exact: every span of a batch has a request id that Kafka's Java
partitioner (murmur2) maps to the record's partition, and the record's key is the first
span's request id, so any murmur2 producer puts the batch where its spans belong. A span
that breaks the rule, or cannot be read, is rejected with its position in the batch; its
neighbours are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import struct

import msgspec

from supportlens.contracts import UNREADABLE, InvalidRecord, Span, decode, explain, why_unreadable

# A batch stays well under Kafka's default 1 MB record limit, and big enough that the
# per-record cost of a consumer is spread over hundreds of spans.
BATCH_BYTES = 256 * 1024

_batch_decoder = msgspec.json.Decoder(list[Span])
_raw_items = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()


_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), the same value as
    aiokafka's, in half its time: the worker checks the partition of every new request."""
    length = len(data)
    h = 0x9747B28C ^ length
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * _M) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * _M) & 0xFFFFFFFF
        h = ((h * _M) & 0xFFFFFFFF) ^ k
    extra = length & 3
    if extra:
        tail = length & ~3
        if extra >= 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * _M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java partitioner (and Faust's, and librdkafka's murmur2) picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class SpanRecord:
    """What one record on a span topic held: the spans that are good, and why the others are not."""

    spans: list[Span] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (position in the batch, reason)
    rejected_values: list[bytes] = field(default_factory=list)  # each rejected span's own bytes, for its dead letter
    batch: bool = False

    def positions(self) -> Iterator[tuple[int, Span]]:
        """The good spans with their positions in the batch (the rejected ones left out)."""
        if not self.rejected:
            yield from enumerate(self.spans)
            return
        bad = {position for position, _ in self.rejected}
        places = (position for position in range(len(self.spans) + len(bad)) if position not in bad)
        yield from zip(places, self.spans)


def is_batch(data: bytes) -> bool:
    """A JSON array (a batch) rather than an object (one span)."""
    return data.lstrip()[:1] == b"["


def decode_spans(data: bytes, max_bytes: int = 1_048_576) -> SpanRecord:
    """The spans of one record, one span or a batch.

    Raises :class:`InvalidRecord` only when the record as a whole cannot be read (not JSON,
    too large, neither an object nor an array); a bad span inside a batch is listed in
    ``rejected`` with its position, and the others are returned.
    """
    if not is_batch(data):
        return SpanRecord([decode(data, Span, max_bytes)])
    if len(data) > max_bytes:
        raise InvalidRecord("span batch", f"record is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    try:
        spans = _batch_decoder.decode(data)
        if spans:
            return SpanRecord(spans, batch=True)
    except (msgspec.DecodeError, *UNREADABLE):
        pass  # one span is bad, or has fields this version does not know: span by span below
    try:
        items = _raw_items.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidRecord("span batch", explain(str(exc))) from None
    except UNREADABLE as exc:
        raise InvalidRecord("span batch", why_unreadable(exc)) from None
    if not items:
        raise InvalidRecord("span batch", "the batch is empty: a record carries at least one span")
    record = SpanRecord(batch=True)
    for position, item in enumerate(items):
        try:
            record.spans.append(decode(bytes(item), Span, max_bytes))
        except InvalidRecord as exc:
            record.rejected.append((position, exc.reason))
            record.rejected_values.append(bytes(item))
    return record


def encode_batch(spans: Iterable[Span]) -> bytes:
    return _encoder.encode(list(spans))


def rejected_reason(position: int, reason: str) -> str:
    """The dead letter's reason for the span at ``position`` of a batch, in every reader's words."""
    return f"span [{position}] of the batch: {reason}"


class Batch(NamedTuple):
    """One record packed by :class:`SpanBatcher`."""

    partition: int
    key: str  # the first span's request id, which murmur2 maps to ``partition``
    value: bytes
    latest_us: int  # the latest ``start_us`` of its spans: the record's timestamp, as one span's record has its own
    spans: int


@dataclass
class SpanBatcher:
    """Packs spans into one record per destination partition (and per ``max_bytes``).

    ``records`` yields ``(partition, key, value)``, ``batches`` the same with the latest
    start time and the span count; the key is the first span's request id, which murmur2
    maps to that partition. A span too large to share a record (over ``max_bytes`` once in
    brackets) goes alone as a plain one-span record: as a batch of one it could pass the
    readers' record limit that the span alone is within.
    """

    partitions: int
    max_bytes: int = BATCH_BYTES
    _open: dict[int, list[bytes]] = field(default_factory=dict)
    _sizes: dict[int, int] = field(default_factory=dict)
    _keys: dict[int, str] = field(default_factory=dict)
    _latest: dict[int, int] = field(default_factory=dict)
    _full: list[Batch] = field(default_factory=list)

    def add(self, span: Span, encoded: bytes | None = None) -> None:
        item = encoded if encoded is not None else _encoder.encode(span)
        partition = partition_of(span.request_id.encode(), self.partitions)
        if len(item) + 2 > self.max_bytes:
            self._full.append(Batch(partition, span.request_id, item, span.start_us, 1))
            return
        size = self._sizes.get(partition, 1)
        if partition in self._open and size + len(item) + 1 > self.max_bytes:
            self._close(partition)
            size = 1
        self._open.setdefault(partition, []).append(item)
        self._keys.setdefault(partition, span.request_id)
        self._latest[partition] = max(span.start_us, self._latest.get(partition, span.start_us))
        self._sizes[partition] = size + len(item) + 1

    def _close(self, partition: int) -> None:
        items = self._open.pop(partition)
        self._sizes.pop(partition, None)
        self._full.append(Batch(partition, self._keys.pop(partition), b"[" + b",".join(items) + b"]",
                                self._latest.pop(partition), len(items)))

    def batches(self) -> Iterator[Batch]:
        """Every record packed so far, the batcher empty afterwards."""
        for partition in list(self._open):
            self._close(partition)
        full, self._full = self._full, []
        yield from full

    def records(self) -> Iterator[tuple[int, str, bytes]]:
        """Every record packed so far as ``(partition, key, value)``, the batcher empty afterwards."""
        for batch in self.batches():
            yield batch.partition, batch.key, batch.value

    def __len__(self) -> int:
        return sum(len(items) for items in self._open.values())


def pack_spans(spans: Iterable[tuple[str, Span]], partitions: int,
               max_record_bytes: int = 1_048_576) -> list[tuple[str, Batch]]:
    """``(topic, span)`` pairs as the records to produce: one per (topic, destination partition),
    more where one would pass :data:`BATCH_BYTES`; topics in the order their first span came.

    ``max_record_bytes`` is what the readers take (``Settings.max_record_bytes``): a batch
    stays within it where it is below ``BATCH_BYTES``, or every reader would refuse it whole.
    """
    limit = min(BATCH_BYTES, max_record_bytes)
    batchers: dict[str, SpanBatcher] = {}
    for topic, span in spans:
        batcher = batchers.get(topic)
        if batcher is None:
            batcher = batchers[topic] = SpanBatcher(partitions, limit)
        batcher.add(span)
    return [(topic, batch) for topic, batcher in batchers.items() for batch in batcher.batches()]
