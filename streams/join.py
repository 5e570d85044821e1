"""The join's state, in memory, and when an input record may be acknowledged (pure: no Kafka).

State without a write per request (DESIGN.md §2): the worker keeps every request in
flight here, not in a changelog table, and *holds the input offsets*. Each input record
is a :class:`Held`; every request it touched holds it until that request's output was
confirmed by Kafka and ``linger_s`` (the grace) more have passed, and records are
acknowledged in read order per partition (:class:`Holds` says why), so Faust commits only
offsets below the first record still held: the committed offset of each partition is the
low-water mark of its open and lately emitted requests.

A worker killed at any moment restarts from there: it re-reads every record of every
request still open or emitted within the last ``linger_s`` (at most about settle + two
graces of input) and rebuilds them. Nothing acknowledged is lost; outputs sent before the
crash are sent again, with the same content. A span later than that linger, for a request
emitted before the crash, finds its earlier records committed: the rebuilt request then
has fewer spans, and its version says so and differs from every version that had other
spans (:func:`streams.correlate.request_version`), so it never replaces the fuller one.

Emitted requests stay here for ``retain_s`` (at most ``max_retained`` of them) so a late
span makes the next version with all spans; a restart forgets them (the late span then
starts a request of its own, as above). A fault report about a request emitted before a
restart is answered from what the partition emitted (:mod:`streams.recall`).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from supportlens.contracts import FaultReport, Side, Span
from streams.correlate import Pending, SideClock, Timing, add_report, add_span, due_at, expired, waiting_for


class Held:
    """One input record: ``ack`` runs once no request that it touched holds it any more, and
    no record read before it on its partition is held either.

    ``epoch`` is its partition's assignment when it was read: a record of a partition this
    worker lost meanwhile is never acknowledged (its offsets belong to the new owner).
    """

    __slots__ = ("token", "partition", "epoch", "open", "released")

    def __init__(self, token: object, partition: object, epoch: int) -> None:
        self.token = token
        self.partition = partition
        self.epoch = epoch
        self.open = 0
        self.released = False


class Holds:
    """Held input records and their acknowledgement, in read order per partition.

    In order, because Faust's commit cannot be trusted with gaps: it commits the first run of
    consecutive acknowledged offsets, and checks that run against the committed offset only
    when one was committed before, and then with one offset to spare (faust-streaming 0.15,
    ``Consumer._new_offset``). Acknowledging offsets 5–9 while 4 is held would commit 10,
    and a restart or rebalance would never read offset 4 again. So a released record waits
    here until every record read before it on its partition is released too.
    """

    def __init__(self, ack: Callable[[object], None]) -> None:
        self.ack = ack
        self.epochs: dict[object, int] = {}
        self.queues: dict[object, deque[Held]] = {}

    def record(self, token: object, partition: object) -> Held:
        """A record just read, in its partition's order; call :meth:`settle` once everything
        it asks for is under way."""
        held = Held(token, partition, self.epochs.get(partition, 0))
        queue = self.queues.get(partition)
        if queue is None:
            queue = self.queues[partition] = deque()
        queue.append(held)
        return held

    def settle(self, held: Held) -> None:
        """A record that nothing holds (any more) is released now."""
        if held.open == 0:
            self._release(held)

    def release(self, holds: Iterable[Held]) -> None:
        for held in holds:
            held.open -= 1
            if held.open == 0:
                self._release(held)

    def _release(self, held: Held) -> None:
        held.released = True
        if self.epochs.get(held.partition, 0) != held.epoch:
            return  # read before its partition moved away
        queue = self.queues[held.partition]
        while queue and queue[0].released:
            self.ack(queue.popleft().token)

    def waiting(self, partition: object) -> int:
        """Records of ``partition`` read and not yet acknowledged (held, or behind one held)."""
        queue = self.queues.get(partition)
        return len(queue) if queue else 0

    def lose(self, partitions: Iterable[object]) -> None:
        """Partitions that moved to another worker: their records are never acknowledged here."""
        for partition in partitions:
            self.epochs[partition] = self.epochs.get(partition, 0) + 1
            self.queues.pop(partition, None)


class Entry:
    """A request in flight: its state, its partition, the records it holds until its next
    emission, and those of emissions confirmed (``cooling``) until ``cool_until``."""

    __slots__ = ("state", "partition", "holds", "cooling", "cool_until")

    def __init__(self, state: Pending, partition: int) -> None:
        self.state = state
        self.partition = partition
        self.holds: list[Held] = []
        self.cooling: list[Held] = []
        self.cool_until = 0.0


class Emission:
    """The outputs of one emission on their way to Kafka; ``done`` per confirmed output runs
    ``confirmed`` once all of them are."""

    __slots__ = ("confirmed", "remaining")

    def __init__(self, confirmed: Callable[[], None], remaining: int) -> None:
        self.confirmed = confirmed
        self.remaining = remaining

    def done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.confirmed()


@dataclass
class Join:
    """Requests in flight per key, their timers, and the records they hold.

    ``ack(token)`` acknowledges an input record (Faust: the message's final ack).
    """

    timing: Timing
    ack: Callable[[object], None]
    max_retained: int = 200_000
    # how long the records of an emitted request stay held (default: the timing's grace)
    linger_s: float = -1.0
    entries: dict[bytes, Entry] = field(default_factory=dict)
    # emitted requests kept for late spans, oldest emission first
    retained: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    # requests that wait for no side, by wall second; those that wait for a side, per
    # (partition, side) by record time
    schedule: list[tuple[float, bytes]] = field(default_factory=list)
    waiting: dict[tuple[int, str], list[tuple[int, bytes]]] = field(default_factory=dict)
    # emitted requests whose records are held a while longer (``linger_s``), by release time
    cooling: list[tuple[float, bytes]] = field(default_factory=list)
    clocks: dict[int, SideClock] = field(default_factory=dict)
    holds: Holds = field(init=False)

    def __post_init__(self) -> None:
        self.holds = Holds(self.ack)
        if self.linger_s < 0:
            self.linger_s = self.timing.grace_s

    # -- input ------------------------------------------------------------------------

    def record(self, token: object, partition: int) -> Held:
        """A record just read; call :meth:`settle` once its spans were added."""
        return self.holds.record(token, partition)

    def settle(self, held: Held) -> None:
        """After a record's spans were added: a record no request holds is acknowledged now."""
        self.holds.settle(held)

    def add_span(self, key: bytes, span: Span, held: Held, now_s: float, ts_ms: int) -> tuple[Entry, bool] | None:
        """Join ``span`` to its request; ``None`` for a redelivered span, else the entry and
        whether the request is new to this worker."""
        entry = self.entries.get(key)
        if entry is None:
            state, _ = add_span(None, span, now_s, ts_ms)
            entry = self.entries[key] = Entry(state, held.partition)
            self._hold(entry, held)
            return entry, True
        _, changed = add_span(entry.state, span, now_s, ts_ms)
        if not changed:
            return None
        self._hold(entry, held)
        return entry, False

    def add_report(self, key: bytes, report: FaultReport, held: Held, now_s: float, ts_ms: int) -> Entry | None:
        """A report waiting on request ``key``; ``None`` when it brought nothing new."""
        entry = self.entries.get(key)
        state, changed = add_report(entry.state if entry else None, report, key.decode(), now_s, ts_ms)
        if not changed:
            return None
        if entry is None:
            entry = self.entries[key] = Entry(state, held.partition)
        self._hold(entry, held)
        return entry

    def _hold(self, entry: Entry, held: Held) -> None:
        if not entry.holds or entry.holds[-1] is not held:  # the spans of one record come together
            entry.holds.append(held)
            held.open += 1

    def file(self, key: bytes, entry: Entry) -> None:
        """Put a request where :meth:`due` will find it (again, after news)."""
        self.retained.pop(key, None)  # news about an emitted request: it is open again
        state = entry.state
        side = waiting_for(state)
        if side is None:
            heapq.heappush(self.schedule, (due_at(state, self.timing), key))
        else:
            heapq.heappush(self.waiting.setdefault((entry.partition, side), []), (state.ref_ms, key))

    def later(self, key: bytes, at_s: float) -> None:
        """Act on a request that was due again at ``at_s`` (its caller could not yet)."""
        heapq.heappush(self.schedule, (at_s, key))

    def clock(self, partition: int, now_s: float) -> SideClock:
        clock = self.clocks.get(partition)
        if clock is None:
            clock = self.clocks[partition] = SideClock(started_s=now_s)
        return clock

    # -- output -----------------------------------------------------------------------

    def due(self, now_s: float, caught_up: Callable[[Side, int], bool]) -> list[tuple[bytes, Entry]]:
        """The requests to act on now; the caller sends them and calls :meth:`sent` for each."""
        keys: list[bytes] = []
        while self.schedule and self.schedule[0][0] <= now_s:
            keys.append(heapq.heappop(self.schedule)[1])
        for (partition, side), queue in self.waiting.items():
            clock = self.clock(partition, now_s)
            ready = caught_up(side, partition)  # type: ignore[arg-type]
            grace = self.timing.grace_s
            while queue and clock.passed(side, queue[0][0], grace, now_s, ready):  # type: ignore[arg-type]
                keys.append(heapq.heappop(queue)[1])
        out: list[tuple[bytes, Entry]] = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None or not entry.holds or key in self.retained:
                continue  # acted on already (a key is filed again with each news)
            side = waiting_for(entry.state)
            if side is None:
                ready = due_at(entry.state, self.timing) <= now_s
            else:
                clock = self.clock(entry.partition, now_s)
                ready = clock.passed(side, entry.state.ref_ms, self.timing.grace_s, now_s,
                                     caught_up(side, entry.partition))
            if ready:
                out.append((key, entry))
            else:
                self.file(key, entry)  # news since it was filed changed what it waits for
        return out

    def sent(self, key: bytes, entry: Entry, outputs: int, now_s: float) -> Emission | None:
        """``outputs`` records of ``entry`` were handed to Kafka at ``now_s``; the returned
        emission's ``done`` runs once per output Kafka confirmed (``None``: nothing to confirm).

        The records a confirmed emission covers are held ``linger_s`` longer (see
        :meth:`cool`): a span that comes late, after the emission, then still finds the
        request's earlier records uncommitted, and a worker killed before it emitted the
        fuller version re-reads them all and emits that version, not one of the late span alone.
        """
        holds, entry.holds = entry.holds, []
        if entry.state.spans:
            self.retained[key] = None
        else:
            del self.entries[key]  # a report about a request with no span: nothing to keep
        confirmed = partial(self._confirmed, key, entry, holds, now_s + self.linger_s)
        if outputs == 0:
            confirmed()
            return None
        return Emission(confirmed, outputs)

    def _confirmed(self, key: bytes, entry: Entry, holds: list[Held], release_at: float) -> None:
        if self.entries.get(key) is not entry or self.linger_s <= 0:
            self.holds.release(holds)  # no spans to be late for, or forgotten meanwhile
            return
        entry.cooling.extend(holds)
        entry.cool_until = max(entry.cool_until, release_at)
        heapq.heappush(self.cooling, (release_at, key))

    def cool(self, now_s: float) -> int:
        """Release the records of emissions confirmed ``linger_s`` ago, for requests without
        news since (news holds them on to the next emission's release); returns how many."""
        released = 0
        while self.cooling and self.cooling[0][0] <= now_s:
            key = heapq.heappop(self.cooling)[1]
            entry = self.entries.get(key)
            if entry is None or not entry.cooling or entry.cool_until > now_s or key not in self.retained:
                continue  # released already, a later emission's time, or open again
            released += len(entry.cooling)
            self._release_cooling(entry)
        return released

    def _release_cooling(self, entry: Entry) -> None:
        cooling, entry.cooling = entry.cooling, []
        self.holds.release(cooling)

    def release(self, holds: Iterable[Held]) -> None:
        self.holds.release(holds)

    def forget(self, now_s: float) -> int:
        """Drop emitted requests past ``retain_s`` (and the oldest, beyond ``max_retained``)."""
        dropped = 0
        while self.retained:
            key = next(iter(self.retained))
            entry = self.entries[key]
            if not expired(entry.state, self.timing, now_s) and len(self.retained) <= self.max_retained:
                break
            del self.retained[key]
            del self.entries[key]
            if entry.cooling:
                self._release_cooling(entry)
            dropped += 1
        return dropped

    # -- rebalancing --------------------------------------------------------------------

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget the requests of partitions this worker no longer owns, unsent: the new owner
        re-reads them from the committed offsets. Their records are never acknowledged here."""
        self.holds.lose(partitions)
        for partition in partitions:
            self.clocks.pop(partition, None)
            for side in ("client", "server"):
                self.waiting.pop((partition, side), None)
        gone = [key for key, entry in self.entries.items() if entry.partition in partitions]
        for key in gone:
            del self.entries[key]
            self.retained.pop(key, None)
        return len(gone)

    @property
    def open_requests(self) -> int:
        return len(self.entries) - len(self.retained)
