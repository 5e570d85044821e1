"""Dead-letter headers: where a record came from, and why it was refused, readable by any consumer."""

from __future__ import annotations

from streams.dead_letters import MAX_REASON_BYTES, dead_letter_headers


def test_a_long_reason_is_cut_at_a_character_boundary():
    # found by fuzzing: the cut fell inside "é" and the header was not UTF-8
    headers = dead_letter_headers("x" + "é" * 1000, "t.client-spans", 2, 17)
    assert headers["reason"].decode("utf-8") == "x" + "é" * 511
    assert len(headers["reason"]) == MAX_REASON_BYTES - 1
    assert (headers["source_topic"], headers["source_partition"], headers["source_offset"]) == (
        b"t.client-spans", b"2", b"17")
