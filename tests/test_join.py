"""The join's memory and its acknowledgements (streams.join), pure: records are tokens."""

from __future__ import annotations

from span_factory import client, server
from streams.correlate import Timing, mark_emitted
from streams.join import Holds, Join

TIMING = Timing(settle_s=1, grace_s=10, retain_s=60)


def test_a_record_is_acknowledged_only_once_every_record_read_before_it_on_its_partition_is():
    acked: list[str] = []
    holds = Holds(acked.append)
    first, second, third = (holds.record(name, 0) for name in ("a", "b", "c"))
    other = holds.record("x", 1)
    for held in (first, second, third, other):
        held.open = 1
    holds.release([second, third])  # released out of order: "a" still holds the partition
    assert acked == [] and holds.waiting(0) == 3
    holds.release([other])  # another partition is not held up by this one
    assert acked == ["x"]
    holds.release([first])
    assert acked == ["x", "a", "b", "c"] and holds.waiting(0) == 0


def test_records_of_a_partition_that_moved_away_are_never_acknowledged_here():
    acked: list[str] = []
    holds = Holds(acked.append)
    old = holds.record("old", 0)
    old.open = 1
    holds.lose([0])
    new = holds.record("new", 0)  # read again by this worker, after the partition came back
    holds.settle(new)
    holds.release([old])
    assert acked == ["new"]


def test_a_request_holds_each_record_of_its_spans_until_its_emission_is_confirmed():
    acked: list[str] = []
    join = Join(TIMING, ack=acked.append)
    one, two = join.record("rec-1", 0), join.record("rec-2", 0)
    entry, new = join.add_span(b"r1", client(), one, now_s=100, ts_ms=100_000)
    assert new
    join.add_span(b"r1", server("edge-gateway", "s1", "c1", 10, 50), two, now_s=100.5, ts_ms=100_500)
    join.settle(one)
    join.settle(two)
    join.file(b"r1", entry)
    assert join.due(101, lambda side, partition: True) == []  # settles 1 s after its last span
    [(key, due)] = join.due(101.6, lambda side, partition: True)
    emission = join.sent(key, due, outputs=2, now_s=101.6)
    assert emission is not None and acked == []
    emission.done()
    assert acked == []  # one of its two outputs is confirmed
    emission.done()
    assert acked == [] and join.open_requests == 0 and b"r1" in join.retained  # confirmed, held a grace more
    join.cool(101.6 + TIMING.grace_s - 0.1)
    assert acked == []
    join.cool(101.6 + TIMING.grace_s)
    assert acked == ["rec-1", "rec-2"]


def test_a_late_span_within_the_grace_after_an_emission_keeps_the_earlier_records_held_to_its_own():
    acked: list[str] = []
    join = Join(TIMING, ack=acked.append)
    always = lambda side, partition: True  # noqa: E731
    first = join.record("rec-1", 0)
    entry, _ = join.add_span(b"r1", server("edge-gateway", "s1", "c1", 10, 50), first, now_s=100, ts_ms=100_000)
    join.clock(0, 100).observe("server", 100_000, 100)
    join.settle(first)
    join.file(b"r1", entry)
    assert join.due(109, always) == []
    [(key, due)] = join.due(110, always)  # the client side fell silent for the grace: server_only
    mark_emitted(due.state, 110)
    join.sent(key, due, outputs=1, now_s=110).done()
    late = join.record("rec-2", 0)
    entry, new = join.add_span(b"r1", client(), late, now_s=115, ts_ms=115_000)  # its client span, late
    assert not new
    join.settle(late)
    join.file(b"r1", entry)
    join.cool(120)  # the first emission's linger is over, but the request has news: rec-1 stays held
    assert acked == []
    [(key, due)] = join.due(116, always)  # news about an emitted request: at once
    mark_emitted(due.state, 116)
    join.sent(key, due, outputs=1, now_s=116).done()
    join.cool(125.9)
    assert acked == []
    join.cool(126)
    assert acked == ["rec-1", "rec-2"]


def test_an_emitted_request_forgotten_after_retention_lets_its_records_go():
    acked: list[str] = []
    join = Join(TIMING, ack=acked.append, linger_s=1000)
    held = join.record("rec-1", 0)
    entry, _ = join.add_span(b"r1", client(), held, now_s=100, ts_ms=100_000)
    join.settle(held)
    join.sent(b"r1", entry, outputs=0, now_s=100)
    mark_emitted(entry.state, 100)
    assert acked == [] and join.forget(100 + TIMING.retain_s) == 1
    assert acked == ["rec-1"] and not join.entries


def test_a_redelivered_span_adds_nothing_and_holds_nothing():
    acked: list[str] = []
    join = Join(TIMING, ack=acked.append)
    join.add_span(b"r1", client(), join.record("rec-1", 0), now_s=100, ts_ms=100_000)
    again = join.record("rec-2", 0)
    assert join.add_span(b"r1", client(), again, now_s=101, ts_ms=101_000) is None
    join.settle(again)
    assert again.open == 0 and acked == []  # behind rec-1, which r1 still holds
