"""Dead letters: a record that cannot be decoded or validated goes to ``dlq`` with its origin.

Headers follow DESIGN.md §1 (``reason``, ``source_topic``, ``source_partition``,
``source_offset``); the value and key are the original bytes, untouched, so the record
can be replayed once the producer is fixed.
"""

from __future__ import annotations

MAX_REASON_BYTES = 1024


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int,
                        position: int | None = None) -> dict[str, bytes]:
    """The headers of a dead letter; ``reason`` is cut to :data:`MAX_REASON_BYTES` of UTF-8,
    at a character boundary, so every consumer can decode it. ``position`` is a bad span's
    place in its batch record (the dead letter's value is then that span alone)."""
    cut = reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
    headers = {
        "reason": cut.encode("utf-8"),
        "source_topic": topic.encode(),
        "source_partition": str(partition).encode(),
        "source_offset": str(offset).encode(),
    }
    if position is not None:
        headers["source_position"] = str(position).encode()
    return headers
