"""Failure signals: what each worker counts per dimension value and time bucket (pure).

The surge detector needs every worker's counts in one place, but reading every span
there again would cost as much as correlating them. So each worker counts as spans and
reports arrive and sends only partial counts — one :class:`SignalCount` per dimension
value and bucket touched since its last flush — plus a :class:`SignalClock` saying how far
in event time it has counted. The detector sums the partials.

A request counts as failed in a dimension once, at its first failure evidence for that
dimension, as the spans arrive — not after correlation, which may wait ``grace`` seconds
for a side that never comes (a network outage has no server side at all), and would delay
every declaration by as much:
- a client span with status error: region, network, app version, platform, and a
  provisional diagnosis class (HTTP 5xx → server_error, a catalogued 4xx → client_misuse,
  a catalogued crash → client_crash with the app as the service, no HTTP status →
  network_unreachable);
- a server span that failed itself (5xx other than 502/504, which say that a dependency
  failed): its service, server_error, and the region, app version and platform it carries.
Fault reports count in region, network, app version and platform when they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from supportlens.contracts import FaultReport, MisuseCount, SignalClock, SignalCount, Span, VersionCount, is_drill
from streams.catalog import Catalog
from streams.surge import DistinctSketch, item_hash

PROPAGATED_STATUSES = frozenset({502, 504})  # "my dependency failed": blame lies deeper
SERVICE_VERSION = "service.version"  # OpenTelemetry's resource attribute, kept on server spans
MAX_VERSIONS_PER_TARGET = 20
OTHER = "(other)"
MAX_ACCOUNTS_PER_CELL = 1000


def span_dimensions(span: Span) -> dict[str, str]:
    """The dimensions every span of a request can tell (no service, no class)."""
    dims = {"region": span.region, "app_version": span.app_version, "platform": span.platform}
    if span.network is not None and span.network.isp:
        dims["network"] = span.network.isp
    return {d: v for d, v in dims.items() if v}


def provisional_class(span: Span, catalog: Catalog) -> str:
    """What a failed client span says on its own, before its request is correlated."""
    http = span.http_status
    if http is not None and http >= 500:
        return "server_error"
    entry = catalog.codes.get(span.error_code)
    if entry is not None and entry.cls in ("client_misuse", "client_crash"):
        return entry.cls
    if http is not None and 400 <= http < 500:
        return "unknown"
    return "network_unreachable" if http is None else "unknown"


def failure_dimensions(span: Span, catalog: Catalog) -> dict[str, str]:
    """The dimension values in which this span is evidence of a failed request; empty when it is not."""
    if span.status != "error":
        return {}
    dims = span_dimensions(span)
    if span.side == "client":
        cls = provisional_class(span, catalog)
        dims["diagnosis_class"] = cls
        if cls == "client_crash":
            dims["service"] = span.service
        return dims
    if span.http_status in PROPAGATED_STATUSES:
        dims["diagnosis_class"] = "server_error"
        return dims
    dims["diagnosis_class"] = "server_error"
    dims["service"] = span.service
    return dims


def _bucket(ts_us: int, bucket_us: int) -> int:
    return ts_us - ts_us % bucket_us


@dataclass
class _Cell:
    failed: int = 0
    reports: int = 0
    requests: int = 0
    users: DistinctSketch = field(default_factory=DistinctSketch)
    active: DistinctSketch = field(default_factory=DistinctSketch)
    accounts: set[str] = field(default_factory=set)


@dataclass
class SignalAggregator:
    """One worker's counts since its last flush. ``source`` names the worker instance."""

    source: str
    bucket_s: int = 10
    max_values_per_dimension: int = 50
    sketch_k: int = 256
    lateness_s: float = 5.0
    _cells: dict[tuple[bool, str, str, int], _Cell] = field(default_factory=dict)
    _misuse: dict[tuple[bool, str, str], tuple[int, int]] = field(default_factory=dict)  # → (count, latest µs)
    # (drill, target, dimension, version, bucket) → [requests, {class: failures}], for the canary comparison
    _versions: dict[tuple[bool, str, str, str, int], list] = field(default_factory=dict)
    _target_versions: dict[str, set[str]] = field(default_factory=dict)
    _values: dict[str, set[str]] = field(default_factory=dict)
    _latest_us: dict[tuple[bool, object], int] = field(default_factory=dict)  # (drill, partition) → event time
    _last_latest_us: dict[bool, int] = field(default_factory=dict)
    _silent_since_us: dict[bool, int] = field(default_factory=dict)  # wall time since which no input moved

    @property
    def bucket_us(self) -> int:
        return self.bucket_s * 1_000_000

    def _cell(self, dimension: str, value: str, ts_us: int, drill: bool) -> _Cell:
        bucket_us = self.bucket_s * 1_000_000
        cell = self._cells.get((drill, dimension, value, ts_us - ts_us % bucket_us))
        if cell is not None:  # the common case: this value was counted in this bucket already
            return cell
        known = self._values.get(dimension)
        if known is None:
            known = self._values[dimension] = set()
        if value not in known:
            # bounded cardinality: values beyond the limit share one line
            if len(known) >= self.max_values_per_dimension:
                value = OTHER
            known.add(value)
        key = (drill, dimension, value, ts_us - ts_us % bucket_us)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell(users=DistinctSketch(self.sketch_k), active=DistinctSketch(self.sketch_k))
        return cell

    def saw(self, partition: object, ts_us: int, drill: bool = False) -> None:
        """An input partition reached event time ``ts_us`` (any record, counted or not); drills
        have a time of their own, so a replay never moves the clock of real traffic."""
        key = (drill, partition)
        if ts_us > self._latest_us.get(key, 0):
            self._latest_us[key] = ts_us

    def request(self, span: Span) -> None:
        """The first span of a request: it counts as traffic in the dimensions it tells."""
        drill = bool(span.attributes) and is_drill(span.attributes)
        user = item_hash(span.user_id) if span.user_id else None  # once, not once per dimension
        network = span.network.isp if span.network is not None else ""
        # span_dimensions(span), unrolled: this runs for every request
        for dimension, value in (("region", span.region), ("app_version", span.app_version),
                                 ("platform", span.platform), ("network", network)):
            if not value:
                continue
            cell = self._cell(dimension, value, span.start_us, drill)
            cell.requests += 1
            if user is not None:
                cell.active.add_hash(user)

    def failure(self, span: Span, dimensions: dict[str, str]) -> None:
        """A request's first failure evidence in ``dimensions`` (the caller dedupes per request)."""
        drill = is_drill(span.attributes)
        for dimension, value in dimensions.items():
            cell = self._cell(dimension, value, span.start_us, drill)
            cell.failed += 1
            if span.user_id:
                cell.users.add(span.user_id)
            if span.account_id and len(cell.accounts) < MAX_ACCOUNTS_PER_CELL:
                cell.accounts.add(span.account_id)
        if dimensions.get("diagnosis_class") == "client_misuse" and span.account_id and span.error_code:
            key = (drill, span.account_id, span.error_code)
            count, latest = self._misuse.get(key, (0, 0))
            self._misuse[key] = (count + 1, max(latest, span.start_us))

    def version(self, span: Span, catalog: Catalog) -> None:
        """One span of a versioned target: a server span whose service names its version, or a
        client span (its app on its platform, at its app version), failed or not."""
        if span.side == "server":
            attributes = span.attributes
            version = attributes.get(SERVICE_VERSION) if attributes else None
            if not version:
                return
            target, dimension = span.service, "service"
            failed = span.status == "error" and span.http_status not in PROPAGATED_STATUSES
            cls = "server_error"
        else:
            version = span.app_version
            if not version:
                return
            target, dimension = f"{span.service}/{span.platform}" if span.platform else span.service, "app_version"
            failed = span.status == "error"
            cls = provisional_class(span, catalog) if failed else ""
        version = str(version)
        known = self._target_versions.setdefault(target, set())
        if version not in known:
            if len(known) >= MAX_VERSIONS_PER_TARGET:
                return  # bounded per flush: a target serving twenty versions at once is not a canary
            known.add(version)
        drill = bool(span.attributes) and is_drill(span.attributes)
        key = (drill, target, dimension, version, _bucket(span.start_us, self.bucket_us))
        cell = self._versions.get(key)
        if cell is None:
            cell = self._versions[key] = [0, {}]
        cell[0] += 1
        if failed:
            cell[1][cls] = cell[1].get(cls, 0) + 1

    def report(self, report: FaultReport) -> None:
        """A fault report counts at the time of the failure it cites (its client log says when),
        not when it was filed: users report 5–60 s later, and counting them then would keep a
        surge alive for a minute after the fault ended."""
        dims = {"region": report.region, "app_version": report.app_version, "platform": report.platform,
                "network": report.network.isp if report.network is not None else ""}
        drill = is_drill(report.attributes)
        cited = report.request_ids[0] if report.request_ids else ""
        at_us = next((s.start_us for s in report.client_log if s.request_id == cited and s.side == "client"),
                     report.received_at_us)
        for dimension, value in dims.items():
            if not value:
                continue
            cell = self._cell(dimension, value, at_us, drill)
            cell.reports += 1
            cell.users.add(report.user_id or report.client_ip)
            if report.account_id and len(cell.accounts) < MAX_ACCOUNTS_PER_CELL:
                cell.accounts.add(report.account_id)

    def watermark(self, caught_up: Callable[[object], bool], now_us: int, drill: bool = False) -> int:
        """Event time up to which this worker has counted: the slowest input partition that
        still has records to read, else the latest record time seen. When no record came
        for ``lateness_s`` (the end of a replay, a quiet night), time goes on without data:
        the wall clock less ``lateness_s``, for records still on their way."""
        mine = {partition: ts for (is_drill_time, partition), ts in self._latest_us.items() if is_drill_time == drill}
        behind = [ts for partition, ts in mine.items() if not caught_up(partition)]
        if behind:
            return min(behind)
        latest = max(mine.values(), default=0)
        if latest != self._last_latest_us.get(drill):
            self._last_latest_us[drill], self._silent_since_us[drill] = latest, now_us
        lateness_us = int(self.lateness_s * 1_000_000)
        if latest and now_us - self._silent_since_us[drill] >= lateness_us:
            return max(latest, now_us - lateness_us)
        return latest

    def flush(self, caught_up: Callable[[object], bool],
              now_us: int) -> list[SignalCount | MisuseCount | SignalClock | VersionCount]:
        """Every partial count since the last flush, then this worker's clock; clears the counts."""
        out: list[SignalCount | MisuseCount | SignalClock | VersionCount] = [
            SignalCount(source=self.source, dimension=dimension, value=value,  # type: ignore[arg-type]
                        bucket_start_us=bucket, failed=cell.failed, reports=cell.reports, requests=cell.requests,
                        users=cell.users.hashes, active_users=cell.active.hashes, accounts=sorted(cell.accounts),
                        drill=drill)
            for (drill, dimension, value, bucket), cell in sorted(self._cells.items())
        ]
        out += [MisuseCount(source=self.source, account_id=account, code=code, at_us=latest, count=count, drill=drill)
                for (drill, account, code), (count, latest) in sorted(self._misuse.items())]
        out += [VersionCount(source=self.source, target=target, dimension=dimension,  # type: ignore[arg-type]
                             version=version, bucket_start_us=bucket, requests=requests, failed=failed, drill=drill)
                for (drill, target, dimension, version, bucket), (requests, failed) in sorted(self._versions.items())]
        self._cells.clear()
        self._misuse.clear()
        self._versions.clear()
        self._target_versions.clear()
        for drill in sorted({drill for drill, _ in self._latest_us}):
            watermark = self.watermark(caught_up, now_us, drill)
            if watermark:
                out.append(SignalClock(source=self.source, watermark_us=watermark, sent_at_us=now_us, drill=drill))
        return out


def count_new_failures(counted: Iterable[str], dimensions: dict[str, str]) -> dict[str, str]:
    """The part of ``dimensions`` a request has not been counted in yet."""
    done = set(counted)
    return {d: v for d, v in dimensions.items() if d not in done}
