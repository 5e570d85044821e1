"""The canary comparison: a rolling-out version against the one it replaces (pure), and
through the surge engine as surge events of kind ``canary``."""

from __future__ import annotations

import math
import random

import pytest

from supportlens.contracts import SignalClock, Span, VersionCount
from streams.canary import Canary, CanaryParams, CanaryState, compare, upper_tail
from streams.catalog import load_catalog
from streams.detect import EngineConfig, SurgeEngine
from streams.incidents import load_policy, stable_digest
from streams.signals import SignalAggregator
from test_incidents import T0, team_of

BUCKET_US = 10_000_000
PARAMS = CanaryParams()


def brute_tail(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.3), (7, 40, 0.05),
                                           (25, 60, 0.5), (11, 10, 0.2), (1, 1, 0.999)])
def test_the_binomial_tail_is_exact(k, n, p):
    assert upper_tail(k, n, p) == pytest.approx(brute_tail(k, n, p), rel=1e-9, abs=1e-300)


def test_a_few_failures_are_never_a_verdict_and_a_clear_difference_is():
    # 3 of 40 requests failed on the new version, none of 400 on the old: suggestive, too few
    assert compare(3, 40, 0, 400, PARAMS)[1] is False
    # 30 of 60 against 4 of 540: worse beyond doubt
    p_value, worse = compare(30, 60, 4, 540, PARAMS)
    assert worse and p_value < 1e-20
    # the same share on both: not worse, whatever the counts
    assert compare(50, 1000, 500, 10_000, PARAMS)[1] is False
    # significant, but the new version's share is under twice the old one's: not a canary verdict
    assert compare(700, 10_000, 500, 10_000, PARAMS)[1] is False


def rollout(canary: Canary, shares: list[float], fail_new: float, fail_old: float, per_bucket: int = 100,
            seed: int = 1) -> list[tuple[int, str]]:
    """One bucket per share of the new version; the findings with the bucket index they came at."""
    rng = random.Random(seed)
    found = []
    for i, share in enumerate(shares):
        bucket = T0 + i * BUCKET_US
        new = sum(rng.random() < share for _ in range(per_bucket))
        for version, n, rate in (("1.4.1", per_bucket - new, fail_old), ("1.4.2", new, fail_new)):
            if n:
                failed = sum(rng.random() < rate for _ in range(n))
                canary.count("payment", "service", version, bucket, n, {"server_error": failed} if failed else {})
        found += [(i, f.phase) for f in canary.evaluate(bucket + BUCKET_US, False, stable_digest)]
    return found


def test_a_bad_rollout_is_found_at_ten_percent_and_ends_when_it_reaches_everyone():
    canary = Canary(PARAMS, CanaryState(), BUCKET_US)
    shares = [0.0] * 6 + [0.1] * 9 + [0.5] * 9 + [1.0] * 6
    found = rollout(canary, shares, fail_new=0.6, fail_old=0.01)
    starts = [i for i, phase in found if phase == "start"]
    ends = [i for i, phase in found if phase == "end"]
    assert len(starts) == 1 and 6 <= starts[0] < 15, found  # while the new version serves 10 %
    assert len(ends) == 1 and ends[0] >= 24, found  # once the old version is gone: nothing to compare
    assert all(phase == "update" for i, phase in found if starts[0] < i < ends[0])


def test_a_good_rollout_and_two_versions_serving_alike_for_a_day_find_nothing():
    canary = Canary(PARAMS, CanaryState(), BUCKET_US)
    assert rollout(canary, [0.0] * 6 + [0.1] * 30 + [0.5] * 30 + [1.0] * 6, fail_new=0.02, fail_old=0.02) == []
    steady = Canary(PARAMS, CanaryState(), BUCKET_US)
    assert rollout(steady, [0.3] * 8640, fail_new=0.03, fail_old=0.03, per_bucket=50, seed=7) == []


def test_a_version_that_recovers_ends_after_three_calm_evaluations():
    canary = Canary(CanaryParams(window_s=30), CanaryState(), BUCKET_US)
    found = rollout(canary, [0.0] * 3 + [0.5] * 6 + [0.5] * 10, fail_new=0.0, fail_old=0.0)
    assert found == []
    bad = Canary(CanaryParams(window_s=30), CanaryState(), BUCKET_US)
    rng_shares = [0.0] * 3 + [0.5] * 6
    found = rollout(bad, rng_shares, fail_new=0.8, fail_old=0.0)
    assert [p for _, p in found][0] == "start"
    later = [(i + len(rng_shares), p) for i, p in rollout(bad, [0.5] * 10, fail_new=0.0, fail_old=0.0, seed=3)]
    assert [p for _, p in later if p == "end"] == ["end"]


def test_workers_count_versions_from_server_spans_attribute_and_client_app_versions():
    aggregator = SignalAggregator(source="w1")
    catalog = load_catalog()
    base = dict(request_id="r1", start_us=T0, duration_us=1000)
    aggregator.version(Span(side="server", service="payment", status="error", http_status=503,
                            attributes={"service.version": "1.4.2"}, **base), catalog)
    aggregator.version(Span(side="server", service="payment", status="error", http_status=502,
                            attributes={"service.version": "1.4.2"}, **base), catalog)  # its dependency failed
    aggregator.version(Span(side="server", service="search", status="ok", **base), catalog)  # no version: not counted
    aggregator.version(Span(side="client", service="mobile-app", platform="android", app_version="5.2.0",
                            status="ok", **base), catalog)
    counts = [s for s in aggregator.flush(lambda _: True, T0) if isinstance(s, VersionCount)]
    assert [(c.target, c.dimension, c.version, c.requests, c.failed) for c in counts] == [
        ("mobile-app/android", "app_version", "5.2.0", 1, {}),
        ("payment", "service", "1.4.2", 2, {"server_error": 1}),
    ]


def test_the_engine_raises_canary_surges_that_never_become_incidents():
    engine = SurgeEngine(EngineConfig(), load_policy(), team_of)
    rng = random.Random(5)
    events = []
    for i in range(40):
        bucket = T0 + i * BUCKET_US
        new_share = 0.0 if i < 10 else 0.2
        n_new = int(200 * new_share)
        for version, n, rate in (("1.4.1", 200 - n_new, 0.01), ("1.4.2", n_new, 0.7)):
            if n:
                failed = sum(rng.random() < rate for _ in range(n))
                engine.on_version(VersionCount(source="w1", target="payment", dimension="service", version=version,
                                               bucket_start_us=bucket, requests=n,
                                               failed={"server_error": failed} if failed else {}))
        out = engine.on_clock(SignalClock(source="w1", watermark_us=bucket + BUCKET_US + 1), wall_s=float(i))
        events += out.surges
        assert out.incidents == []
    canaries = [e for e in events if e.kind == "canary"]
    assert canaries and canaries[0].phase == "start"
    first = canaries[0]
    assert (first.dimension, first.value) == ("service", "payment")
    a = first.attributes
    assert (a["version"], a["baseline_version"], a["diagnosis_class"]) == ("1.4.2", "1.4.1", "server_error")
    assert float(a["failure_share"]) > 0.3 > 0.05 > float(a["baseline_failure_share"])
    assert first.started_at_us <= T0 + 14 * BUCKET_US  # within a few buckets of the first new-version request
    assert all(e.surge_id == first.surge_id for e in canaries)
    assert not any(e.kind == "surge" for e in events)  # counts of versions are no dimension's surge
