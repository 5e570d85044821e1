"""Read a bounded range of topics: from given offsets up to the end offsets seen at the start.

Used to summarize a run and to check what landed; it joins no consumer group and
commits nothing, so it never disturbs the pipeline's own consumers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from supportlens.config import Settings
from supportlens.errors import UserError

Offsets = dict[tuple[str, int], int]


def _consumer(settings: Settings) -> Consumer:
    return Consumer(
        settings.kafka_config(
            **{
                "group.id": f"supportlens-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
    )


def end_offsets(settings: Settings, topics: Iterable[str], timeout: float = 10.0) -> Offsets:
    """The high watermark of every partition of ``topics`` (full names)."""
    consumer = _consumer(settings)
    try:
        metadata = consumer.list_topics(timeout=timeout)
        out: Offsets = {}
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                raise UserError(f"topic {topic} does not exist", hint="run `supportlens topics create` first")
            for partition in meta.partitions:
                out[(topic, partition)] = _high_watermark(consumer, TopicPartition(topic, partition), timeout)
        return out
    except KafkaException as exc:
        raise UserError(f"cannot read offsets from Kafka at {settings.kafka_bootstrap}: {exc}") from None
    finally:
        consumer.close()


# For a moment after a topic is created (or a broker restarts) its leader is not settled;
# librdkafka does not flag all of these as retriable, so they are named here.
TRANSIENT_ERRORS = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
}


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)[1]
        except KafkaException as exc:
            error = exc.args[0]
            if not (error.retriable() or error.code() in TRANSIENT_ERRORS) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_range(
    settings: Settings, start: Offsets | Iterable[str], end: Offsets | None = None, idle_timeout: float = 30.0
) -> Iterator[Message]:
    """Every message from ``start`` (offsets, or topic names meaning their beginning) up to ``end``.

    ``end`` defaults to the end offsets at call time. Raises :class:`UserError` if no
    message arrives for ``idle_timeout`` seconds while some are still expected.
    """
    if not isinstance(start, dict):
        topics = list(start)
        end = end if end is not None else end_offsets(settings, topics)
        start = {tp: OFFSET_BEGINNING for tp in end}
    end = end if end is not None else end_offsets(settings, {topic for topic, _ in start})
    remaining = {tp: high for tp, high in end.items() if high > max(start.get(tp, 0), 0)}
    if not remaining:
        return
    consumer = _consumer(settings)
    try:
        consumer.assign([TopicPartition(t, p, start.get((t, p), OFFSET_BEGINNING)) for (t, p) in remaining])
        idle = 0.0
        while remaining:
            batch = consumer.consume(num_messages=5000, timeout=1.0)
            if not batch:
                idle += 1.0
                if idle >= idle_timeout:
                    raise UserError(f"Kafka stopped delivering before the end offsets; still waiting on {sorted(remaining)}")
                continue
            idle = 0.0
            for message in batch:
                if message.error() is not None:
                    raise UserError(f"Kafka read error: {message.error().str()}")
                high = remaining.get((message.topic(), message.partition()))
                if high is not None and message.offset() < high:
                    yield message
            # positions, not the last offset seen: compaction and transaction markers leave gaps
            for tp in consumer.position([TopicPartition(t, p) for (t, p) in remaining]):
                if tp.offset >= remaining[(tp.topic, tp.partition)]:
                    del remaining[(tp.topic, tp.partition)]
    finally:
        consumer.close()
