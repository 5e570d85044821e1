"""Span records: one span or a batch, decoded span by span when one is bad; murmur2 as Kafka's."""

from __future__ import annotations

import os
import uuid

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from supportlens.contracts import InvalidRecord, Span, encode
from supportlens.span_batches import SpanBatcher, decode_spans, murmur2, partition_of


def _span(i: int = 0, **fields) -> Span:
    return Span(**{"request_id": str(uuid.uuid4()), "side": "server", "service": "payment", "start_us": 1_000 + i,
                   "duration_us": 5, "status": "ok", **fields})


def test_murmur2_is_kafkas_for_every_length():
    for n in range(2000):
        key = os.urandom(n % 70)
        assert murmur2(key) == aiokafka_murmur2(key)


def test_the_batcher_puts_each_span_into_the_record_of_its_partition_keyed_to_land_there():
    spans = [_span(i) for i in range(300)]
    batcher = SpanBatcher(partitions=6, max_bytes=4096)
    for span in spans:
        batcher.add(span)
    records = list(batcher.records())
    assert len(records) > 6  # 4 KB records: several per partition
    seen = []
    for partition, key, value in records:
        assert partition_of(key.encode(), 6) == partition
        assert len(value) <= 4096
        decoded = decode_spans(value)
        assert decoded.batch and not decoded.rejected
        assert {partition_of(s.request_id.encode(), 6) for s in decoded.spans} == {partition}
        seen.extend(decoded.spans)
    assert sorted(seen, key=lambda s: s.start_us) == spans
    assert list(batcher.records()) == [] and len(batcher) == 0


def test_a_single_span_record_of_the_old_format_is_one_span():
    span = _span()
    record = decode_spans(encode(span))
    assert record.spans == [span] and not record.batch


def test_a_bad_span_in_a_batch_is_rejected_with_its_position_and_its_neighbours_kept():
    good = [_span(i) for i in range(3)]
    newer = encode(good[2])[:-1] + b',"added_later":"x"}'  # a field this version does not know
    data = b"[" + encode(good[0]) + b',{"request_id":"r","side":"server"},' + encode(good[1]) + b"," + newer + b"]"
    record = decode_spans(data)
    assert [s.request_id for s in record.spans] == [s.request_id for s in good]
    assert record.spans[2].attributes == {"added_later": "x"}
    assert [position for position, _ in record.rejected] == [1]
    assert "service" in record.rejected[0][1] or "start_us" in record.rejected[0][1]


@pytest.mark.parametrize("data", [b"[1, 2", b"not json", b'"a string"', b"[" + b"[" * 5000 + b"]" * 5000 + b"]"])
def test_a_record_that_is_not_spans_at_all_is_invalid_with_a_reason(data):
    try:
        record = decode_spans(data)
    except InvalidRecord as exc:
        assert exc.reason
    else:  # an array of things that are not spans: every position rejected, nothing kept
        assert not record.spans and record.rejected and all(reason for _, reason in record.rejected)


def test_a_batch_over_the_record_limit_is_refused_whole():
    data = b"[" + b",".join(encode(_span(i)) for i in range(50)) + b"]"
    with pytest.raises(InvalidRecord, match="over the"):
        decode_spans(data, max_bytes=1024)
