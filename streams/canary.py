"""Canary comparison: is a version that rolls out worse than the one it replaces? (pure)

While two versions of one service (server spans carry ``service.version``) or of one app on
one platform (client spans carry ``app_version``) serve traffic at once, the newer is
compared with the *incumbent* — the version seen first among those still serving (a request
in the last ``serving_s``) — over the last ``window_s``, class by class: the share of its
requests that failed with the class.

The test is exact at low counts: conditioned on the total failures ``x`` of both versions,
the newer version's failures follow ``Binomial(x, n_new / (n_new + n_old))`` if both fail
at one rate. The p-value is that binomial's upper tail at the newer version's failures. A
version is *worse* when it has at least ``min_failures`` failures of the class, its share is
at least ``min_ratio`` times the incumbent's, and the p-value is below ``alpha`` (small:
the comparison runs every bucket, for every target and class, all day). It stays worse
until ``end_buckets`` evaluations in a row say otherwise, or the incumbent stops serving
(the rollout reached everyone, or was rolled back: nothing left to compare).

Everything is plain data (:class:`CanaryState`) kept with the engine's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True)
class CanaryParams:
    window_s: int = 300
    serving_s: int = 30  # a version with no request for this long no longer serves
    min_failures: int = 5
    min_requests: int = 30  # of each version in the window, before any comparison
    min_ratio: float = 2.0
    alpha: float = 1e-6
    end_buckets: int = 3
    max_versions: int = 20  # per target: the oldest-seen beyond it are forgotten


class Tally(msgspec.Struct, kw_only=True):
    """One version of one target: its first bucket, its counts per bucket."""

    first_seen_us: int
    requests: dict[int, int] = {}
    failed: dict[int, dict[str, int]] = {}  # bucket → class → failures


class Verdict(msgspec.Struct, kw_only=True):
    """An open finding: ``version`` of the target is worse than ``baseline`` in ``cls``."""

    canary_id: str
    target: str
    dimension: str
    version: str
    baseline: str
    cls: str
    started_at_us: int
    calm: int = 0  # evaluations in a row that did not find it worse


class TargetState(msgspec.Struct, kw_only=True):
    dimension: str  # "service" or "app_version" (what the surge event says it is about)
    versions: dict[str, Tally] = {}
    open: dict[str, Verdict] = {}  # by "version|class"


class CanaryState(msgspec.Struct, kw_only=True):
    targets: dict[str, TargetState] = {}  # by "drill|target"


@dataclass(frozen=True)
class Comparison:
    """One evaluation of one version against the incumbent, for one class."""

    target: str
    dimension: str
    version: str
    baseline: str
    cls: str
    failures: int
    requests: int
    baseline_failures: int
    baseline_requests: int
    p_value: float
    worse: bool

    @property
    def share(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def baseline_share(self) -> float:
        return self.baseline_failures / self.baseline_requests if self.baseline_requests else 0.0


@dataclass(frozen=True)
class Finding:
    """What changed at one evaluation: a verdict opened, held, or closed."""

    phase: str  # start | update | end
    verdict: Verdict
    comparison: Comparison | None  # None when the incumbent stopped serving


def upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact, no SciPy)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        total += term
        if i > n * p and term < total * 1e-15:
            break  # past the mode the terms only shrink
    return min(1.0, total)


def compare(failures: int, requests: int, base_failures: int, base_requests: int,
            params: CanaryParams) -> tuple[float, bool]:
    """The p-value that the newer version fails no more often than the incumbent, and the verdict."""
    total = failures + base_failures
    p_value = upper_tail(failures, total, requests / (requests + base_requests)) if requests and base_requests else 1.0
    share, base_share = failures / max(requests, 1), base_failures / max(base_requests, 1)
    worse = (failures >= params.min_failures and requests >= params.min_requests
             and base_requests >= params.min_requests and share >= params.min_ratio * base_share
             and p_value < params.alpha)
    return p_value, worse


class Canary:
    """The comparisons over the engine's closed buckets; methods mutate ``state``."""

    def __init__(self, params: CanaryParams, state: CanaryState, bucket_us: int) -> None:
        self.params = params
        self.state = state
        self.bucket_us = bucket_us

    def count(self, target: str, dimension: str, version: str, bucket_us: int, requests: int,
              failed: dict[str, int], drill: bool = False) -> None:
        key = f"{int(drill)}|{target}"
        entry = self.state.targets.get(key)
        if entry is None:
            entry = self.state.targets[key] = TargetState(dimension=dimension)
        tally = entry.versions.get(version)
        if tally is None:
            tally = entry.versions[version] = Tally(first_seen_us=bucket_us)
            if len(entry.versions) > self.params.max_versions:
                oldest = min(entry.versions, key=lambda v: entry.versions[v].first_seen_us)
                del entry.versions[oldest]
        tally.first_seen_us = min(tally.first_seen_us, bucket_us)
        tally.requests[bucket_us] = tally.requests.get(bucket_us, 0) + requests
        if failed:
            cell = tally.failed.setdefault(bucket_us, {})
            for cls, n in failed.items():
                cell[cls] = cell.get(cls, 0) + n

    def evaluate(self, until_us: int, drill: bool, digest: Callable[[str], str]) -> list[Finding]:
        """Compare over the window of buckets that end by ``until_us`` (every bucket before it is
        closed); ``digest`` names new verdicts deterministically."""
        since = until_us - self.params.window_s * 1_000_000
        findings: list[Finding] = []
        for key, entry in sorted(self.state.targets.items()):
            if key.startswith("1|") != drill:
                continue
            target = key.split("|", 1)[1]
            self._forget(entry, since)
            sums = {v: self._sums(t, since, until_us) for v, t in entry.versions.items()}
            recent = until_us - self.params.serving_s * 1_000_000
            serving = sorted((v for v, t in entry.versions.items() if any(b >= recent for b in t.requests)),
                             key=lambda v: (entry.versions[v].first_seen_us, v))
            worse_now: dict[str, Comparison] = {}
            if len(serving) >= 2:
                incumbent = serving[0]
                base_n, base_failed = sums[incumbent]
                for version in serving[1:]:
                    n, failed = sums[version]
                    for cls in sorted(failed):
                        p_value, worse = compare(failed[cls], n, base_failed.get(cls, 0), base_n, self.params)
                        c = Comparison(target, entry.dimension, version, incumbent, cls, failed[cls], n,
                                       base_failed.get(cls, 0), base_n, p_value, worse)
                        if worse:
                            worse_now[f"{version}|{cls}"] = c
                        elif f"{version}|{cls}" in entry.open:
                            worse_now.setdefault(f"calm:{version}|{cls}", c)
            findings += self._decide(entry, target, worse_now, until_us, digest)
        return findings

    def _decide(self, entry: TargetState, target: str, now: dict[str, Comparison], until_us: int,
                digest: Callable[[str], str]) -> list[Finding]:
        out: list[Finding] = []
        for vkey, c in sorted(now.items()):
            if vkey.startswith("calm:"):
                continue
            verdict = entry.open.get(vkey)
            if verdict is None:
                verdict = entry.open[vkey] = Verdict(
                    canary_id=f"canary-{digest(f'{target}:{vkey}:{until_us}')}", target=target,
                    dimension=c.dimension, version=c.version,
                    baseline=c.baseline, cls=c.cls, started_at_us=until_us)
                out.append(Finding("start", verdict, c))
            else:
                verdict.calm = 0
                out.append(Finding("update", verdict, c))
        for vkey in sorted(entry.open):
            if vkey in now:
                continue
            verdict = entry.open[vkey]
            calm = now.get(f"calm:{vkey}")
            verdict.calm += 1
            if calm is None or verdict.calm >= self.params.end_buckets:
                del entry.open[vkey]  # no incumbent left to compare with, or calm long enough
                out.append(Finding("end", verdict, calm))
        return out

    def _sums(self, tally: Tally, since: int, until: int) -> tuple[int, dict[str, int]]:
        n = sum(c for b, c in tally.requests.items() if since <= b < until)
        failed: dict[str, int] = {}
        for b, cells in tally.failed.items():
            if since <= b < until:
                for cls, k in cells.items():
                    failed[cls] = failed.get(cls, 0) + k
        return n, failed

    def _forget(self, entry: TargetState, since: int) -> None:
        for version in list(entry.versions):
            tally = entry.versions[version]
            tally.requests = {b: c for b, c in tally.requests.items() if b >= since}
            tally.failed = {b: c for b, c in tally.failed.items() if b >= since}
            if not tally.requests and not any(v.version == version for v in entry.open.values()):
                del entry.versions[version]
