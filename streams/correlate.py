"""Correlation of client and server spans by request id, as pure functions over a state record.

The worker keeps one :class:`Pending` per request id in memory (``streams.join``) and
calls these functions; they decide *what* and *when*, never touch Kafka.

When a request is emitted:
- both sides seen (a client span and the entry server span): ``settle`` seconds after
  the last span arrived, so stragglers from deeper hops still make it in;
- a side missing: once that side's stream, in the same partition, has moved ``grace``
  seconds past the request in record time (Kafka timestamps, set by our producers, not
  by device clocks) — so a worker that lags, or catches up after a restart, does not
  give up on a side it simply has not read yet; or once that stream has been silent
  for ``grace`` seconds of wall time;
- a span arriving after emission: at once, as the next ``version``.
``version`` (see :func:`request_version`) is the span count with a digest of the spans'
identities below it: more spans, a higher version; the same version, the same spans. So a
request rebuilt after a crash from fewer spans than it had (the re-read starts after some
of them) never repeats a version with other content and never outranks the fuller one.
A report waiting on a request is diagnosed when the request is emitted.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from operator import attrgetter

import msgspec

from supportlens.contracts import CorrelatedRequest, FaultReport, Hop, Side, Span, is_drill
from streams.catalog import Catalog
from streams.diagnose import diagnose_spans


@dataclass(frozen=True)
class Timing:
    settle_s: float
    grace_s: float
    retain_s: float


class Pending(msgspec.Struct, kw_only=True, gc=False):
    """What is known of one request id, kept in the worker's memory (``streams.join``).

    ``client``, ``servers`` and ``server_ids`` are ``spans`` sorted by side as they came,
    so the questions asked of a request on every batch (does it wait for a side? which
    hop is its root?) cost no pass over all of its spans. Untracked by the garbage
    collector (``gc=False``), like the spans it holds: nothing in it points back at it.
    """

    spans: list[Span] = []
    reports: list[FaultReport] = []  # reports naming this request, not yet answered
    ref_ms: int = 0  # earliest record timestamp among what joined this request
    first_seen_s: float = 0.0
    last_seen_s: float = 0.0
    emitted_version: int = 0  # span count of the last request emitted; 0 = none yet
    emitted_at_s: float = 0.0
    counted: list[str] = []  # dimensions this request was counted in as failed (surge signals)
    identities: set[tuple[str, str, str]] = set()  # of ``spans``, to recognize a redelivery at once
    client: Span | None = None  # the earliest client span
    servers: list[Span] = []
    server_ids: set[str] = set()
    drill: bool = False  # any span replayed by a drill
    digest: int = 0  # sum of the spans' identity CRCs, for request_version


def _identity(span: Span) -> tuple[str, str, str]:
    return (span.side, span.span_id, span.service) if span.span_id else (span.side, str(span.start_us), span.service)


def add_span(state: Pending | None, span: Span, now_s: float, ts_ms: int = 0) -> tuple[Pending, bool]:
    """The state with ``span`` (from a record stamped ``ts_ms``) added; ``False`` for a redelivery."""
    state = state or Pending(first_seen_s=now_s)
    key = _identity(span)
    if key in state.identities:
        return state, False
    state.identities.add(key)
    state.digest += zlib.crc32("\x1f".join(key).encode())
    state.spans.append(span)
    if span.side == "client":
        client = state.client
        if client is None or (span.start_us, span.span_id) < (client.start_us, client.span_id):
            state.client = span
    else:
        state.servers.append(span)
        state.server_ids.add(span.span_id)
    if span.attributes and not state.drill:
        state.drill = is_drill(span.attributes)
    state.last_seen_s = now_s
    if not state.first_seen_s:
        state.first_seen_s = now_s
    if ts_ms and (not state.ref_ms or ts_ms < state.ref_ms):
        state.ref_ms = ts_ms
    return state, True


def add_report(
    state: Pending | None, report: FaultReport, request_id: str, now_s: float, ts_ms: int = 0
) -> tuple[Pending, bool]:
    """The state with a report waiting on it; ``False`` when nothing was new.

    The client spans the user attached for this request join its spans: for a user who
    did not consent to client tracing they are the only client-side evidence we get.
    """
    state = state or Pending(first_seen_s=now_s, last_seen_s=now_s)
    changed = False
    if not any(r.report_id == report.report_id for r in state.reports):
        state.reports.append(report)
        changed = True
        if ts_ms and (not state.ref_ms or ts_ms < state.ref_ms):
            state.ref_ms = ts_ms
    for span in report.client_log:
        if span.request_id == request_id and span.side == "client":
            state, added = add_span(state, span, now_s, ts_ms)
            changed = changed or added
    return state, changed


def waiting_for(state: Pending) -> Side | None:
    """The side a request not yet emitted still waits for; ``None`` when it waits for nothing."""
    if state.emitted_version:
        return None
    servers = state.servers
    if not servers:
        return "server"
    if state.client is None:
        return "client"
    ids = state.server_ids
    for span in servers:
        if span.parent_span_id not in ids:
            return None  # an entry hop: both sides are in
    return "client"


def due_at(state: Pending, timing: Timing) -> float:
    """Wall-clock second at which to act on a request that waits for no side."""
    if state.emitted_version:
        return state.last_seen_s  # news about a request already emitted: act now
    return state.last_seen_s + timing.settle_s


def expired(state: Pending, timing: Timing, now_s: float) -> bool:
    """An emitted request no longer waits for late spans."""
    return state.emitted_at_s + timing.retain_s <= now_s


@dataclass
class SideClock:
    """How far each side's stream of one partition has come: its latest record time, and when.

    The latest, not the highest: a replay (a drill, a simulated past) moves record time
    backwards, and requests from it must wait for *its* stream, not for one long gone.
    """

    started_s: float
    seen_ms: dict[str, int] = field(default_factory=lambda: {"client": 0, "server": 0})
    arrived_s: dict[str, float] = field(default_factory=dict)

    def observe(self, side: Side, ts_ms: int, now_s: float) -> None:
        self.seen_ms[side] = ts_ms
        self.arrived_s[side] = now_s

    def passed(self, side: Side, ref_ms: int, grace_s: float, now_s: float, caught_up: bool = True) -> bool:
        """Has ``side`` moved ``grace_s`` past ``ref_ms``, or been silent for ``grace_s``?

        Silence counts only when the worker has read all there is (``caught_up``): a stream
        it has not fetched yet (a backlog after a restart, a starved partition) is not silent.
        """
        if self.seen_ms[side] >= ref_ms + grace_s * 1000:
            return True
        return caught_up and now_s - self.arrived_s.get(side, self.started_s) >= grace_s


COUNT_SHIFT = 20  # the version's low 20 bits are the digest, the 12 above them the span count
MAX_COUNTED = (1 << (32 - COUNT_SHIFT)) - 1  # fits ClickHouse's UInt32 version column


def request_version(state: Pending) -> int:
    """Span count (saturating at 4,095) above a digest of the spans' identities.

    Order-independent (a sum of CRC-32s, kept as spans are added) and the same in every
    process, so a rebuilt request with the same spans gets the same version, and one with
    other spans of the same count gets another (they coincide by chance in one in a million).
    """
    return (min(len(state.spans), MAX_COUNTED) << COUNT_SHIFT) | (state.digest & ((1 << COUNT_SHIFT) - 1))


_hop_order = attrgetter("start_us", "service", "span_id")  # in C: this sorts every emitted request


def build_request(request_id: str, state: Pending, catalog: Catalog, drill: bool = False) -> CorrelatedRequest:
    """The correlated request for the spans seen so far (deterministic in the spans, not their order)."""
    client = state.client
    servers = sorted(state.servers, key=_hop_order)
    ids = state.server_ids
    # in hop order, the first span without a server caller is root_of's (earliest, then by service)
    root = next((s for s in servers if s.parent_span_id not in ids), None)
    start = min(servers[0].start_us, client.start_us) if servers and client else (
        servers[0].start_us if servers else client.start_us)  # type: ignore[union-attr]
    any_span = client or root or servers[0]
    hops = [
        Hop(
            service=s.service,
            team=catalog.team_of(s.service),
            operation=s.operation,
            span_id=s.span_id,
            parent_span_id=s.parent_span_id,
            offset_us=s.start_us - start,
            duration_us=s.duration_us,
            status=s.status,
            http_status=s.http_status,
            error_code=s.error_code,
        )
        for s in servers
    ]
    return CorrelatedRequest(
        request_id=request_id,
        version=request_version(state),
        trace_id=any_span.trace_id,
        start_us=start,
        operation=(client or root or any_span).operation,
        user_id=next((s.user_id for s in [client, *servers] if s and s.user_id), ""),
        account_id=next((s.account_id for s in [client, *servers] if s and s.account_id), ""),
        client_ip=client.client_ip if client else "",
        app_version=(client or any_span).app_version,
        platform=(client or any_span).platform,
        region=(client or any_span).region,
        network=client.network if client else None,
        has_client=client is not None,
        has_server=bool(servers),
        client_duration_us=client.duration_us if client else 0,
        client_status=client.status if client else "ok",
        client_http_status=client.http_status if client else None,
        client_error_code=client.error_code if client else "",
        server_duration_us=root.duration_us if root else 0,
        server_status="error" if any(h.status == "error" for h in hops) else "ok",
        server_http_status=root.http_status if root else None,
        root_service=root.service if root else "",
        teams=sorted({h.team for h in hops}),
        hops=hops,
        span_count=len(state.spans),
        diagnosis=diagnose_spans(client, servers, catalog, root=root, ordered=True),
        completeness="complete" if client and servers else ("client_only" if client else "server_only"),
        drill=drill,
    )


def mark_emitted(state: Pending, now_s: float) -> Pending:
    """After the request (if it has spans) and its waiting reports were sent."""
    state.emitted_version = len(state.spans)
    state.emitted_at_s = now_s
    state.reports = []
    return state
