"""Run the surge and incident decisions over an event stream without Kafka.

The worker's counting (:mod:`streams.signals`) and the engine (:mod:`streams.detect`) are
pure; this drives them over records in event-time order — a simulator run or records read
back from storage — as one worker would, flushing its counts once per simulated second.
It is how a whole simulated day is evaluated in seconds (``make bench``), and it is the
reference the Kafka pipeline is tested against.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from supportlens.contracts import (
    Account, Change, FaultReport, MisuseCount, Record, SignalClock, SignalCount, Span, VersionCount, is_drill,
)
from streams.catalog import Catalog
from streams.detect import EngineConfig, Outputs, SurgeEngine
from streams.incidents import Policy
from streams.notices import Notifier
from streams.signals import SignalAggregator, count_new_failures, failure_dimensions

SECOND_US = 1_000_000
_REMEMBERED_REQUESTS = 200_000


@dataclass
class RequestCounter:
    """Per-request bookkeeping of a worker: which dimensions a request was counted in (bounded)."""

    aggregator: SignalAggregator
    catalog: Catalog

    def __post_init__(self) -> None:
        self._counted: OrderedDict[str, set[str]] = OrderedDict()

    def span(self, span: Span) -> None:
        counted = self._counted.get(span.request_id)
        if counted is None:
            counted = self._counted[span.request_id] = set()
            self.aggregator.request(span)
            if len(self._counted) > _REMEMBERED_REQUESTS:
                self._counted.popitem(last=False)
        if span.side == "client" or span.attributes:
            self.aggregator.version(span, self.catalog)
        new = count_new_failures(counted, failure_dimensions(span, self.catalog))
        if new:
            counted.update(new)
            self.aggregator.failure(span, new)


def replay(records: Iterable[tuple[int, Record]], catalog: Catalog, policy: Policy,
           config: EngineConfig = EngineConfig(), notifier: Notifier | None = None,
           engine: SurgeEngine | None = None, clock_every_s: int = 1) -> Outputs:
    """Feed ``(event time µs, record)`` pairs, in time order, through counting and the engine.

    Account records fill the engine's accounts; Change records go to the engine (suspects). Pass ``engine`` to continue one across calls
    (one run a day for a simulated week). ``clock_every_s`` is the event time between two
    flushes: a worker catching up on a backlog reads minutes of it between two of its clocks."""
    aggregator = SignalAggregator(source="offline", bucket_s=config.surge.bucket_s, sketch_k=config.sketch_k)
    counter = RequestCounter(aggregator, catalog)
    accounts: dict[str, Account] = {}
    if engine is None:
        engine = SurgeEngine(config, policy, catalog.team_of, notifier=notifier, accounts=accounts)
    else:
        accounts = engine.accounts  # type: ignore[assignment]
    out = Outputs()
    next_flush = None
    always_behind = lambda _partition: False  # noqa: E731 - one input, read in order

    def flush(now_us: int) -> None:
        for signal in aggregator.flush(always_behind, now_us):
            if isinstance(signal, SignalClock):
                # the simulated second is the wall clock of an offline run: no source ever idles
                out.extend(engine.on_clock(signal, now_us / SECOND_US))
            elif isinstance(signal, SignalCount):
                engine.on_count(signal)
            elif isinstance(signal, MisuseCount):
                out.extend(engine.on_misuse(signal))
            elif isinstance(signal, VersionCount):
                engine.on_version(signal)

    for ts_us, record in records:
        if next_flush is None:
            next_flush = ts_us - ts_us % SECOND_US + SECOND_US * clock_every_s
        while ts_us >= next_flush:
            flush(next_flush)
            next_flush += SECOND_US * clock_every_s
        if isinstance(record, Account):
            accounts[record.account_id] = record
            continue
        if isinstance(record, Change):
            out.extend(engine.on_change(record))  # a change is no input partition's event time
            continue
        aggregator.saw("in", ts_us, is_drill(record.attributes) if isinstance(record, (Span, FaultReport)) else False)
        if isinstance(record, Span):
            counter.span(record)
        elif isinstance(record, FaultReport):
            aggregator.report(record)
    if next_flush is not None:
        flush(next_flush)
    return out
