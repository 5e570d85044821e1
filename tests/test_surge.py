"""Surge detection and the distinct-user sketch, on seeded synthetic series (no Kafka)."""

from __future__ import annotations

import math
import random
from functools import cache

import msgspec
import pytest

from streams.surge import (
    DetectorState,
    DistinctSketch,
    Reading,
    SurgeDetector,
    SurgeParams,
    score_series,
    surge_score,
)

US = 1_000_000
PARAMS = SurgeParams()
BUCKET_US = PARAMS.bucket_s * US
DAY = 86_400 // PARAMS.bucket_s  # buckets per day
HOUR = DAY // 24
T0 = 1_699_920_000 * US  # 2023-11-14 00:00 UTC: bucket i of a series starts at T0 + i·bucket


def poisson(rng: random.Random, mean: float) -> int:
    """Knuth's sampler: fine for the means used here (≤ a few hundred)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def daily_mean(i: int) -> float:
    """Smooth daily sinusoid per bucket: 20 at 14:00, 2 (10 % of the peak) at 02:00."""
    hours = (i % DAY) / HOUR
    return 11.0 + 9.0 * math.cos(2 * math.pi * (hours - 14) / 24)


@cache
def seasonal_week() -> tuple[int, ...]:
    rng = random.Random(20231114)
    return tuple(poisson(rng, daily_mean(i)) for i in range(7 * DAY))


def feed(counts, params: SurgeParams = PARAMS, detector: SurgeDetector | None = None, first: int = 0) -> list[Reading]:
    detector = detector or SurgeDetector(params)
    readings: list[Reading] = []
    for i, count in enumerate(counts, start=first):
        readings += detector.observe(T0 + i * BUCKET_US, count)
    return readings


def steady(mean: float, buckets: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [poisson(rng, mean) for _ in range(buckets)]


def test_a_week_of_daily_seasonality_raises_no_surge():
    readings = feed(seasonal_week())
    assert len(readings) == 7 * DAY
    assert not any(r.surging for r in readings), max(readings, key=lambda r: r.score)
    # The baseline follows the curve rather than sitting on the weekly mean.
    day5 = readings[5 * DAY : 6 * DAY]
    assert max(abs(r.baseline - daily_mean(5 * DAY + i)) for i, r in enumerate(day5)) < 2.0


def test_a_tenfold_step_is_one_surge_from_its_first_bucket_with_a_frozen_baseline():
    counts = list(seasonal_week())
    rng = random.Random(3)
    step_start, step_end = 2 * DAY + 13 * HOUR, 2 * DAY + 13 * HOUR + 120  # 20 min on day 3
    for i in range(step_start, step_end):
        counts[i] = poisson(rng, 10 * daily_mean(i))
    readings = feed(counts)

    starts = [i for i, r in enumerate(readings) if r.phase == "start"]
    ends = [i for i, r in enumerate(readings) if r.phase == "end"]
    assert starts == [step_start]
    assert len(ends) == 1 and step_end <= ends[0] <= step_end + PARAMS.end_quiet_buckets
    assert all(r.surging for r in readings[step_start : ends[0]])
    assert readings[step_start].bucket_start_us == T0 + step_start * BUCKET_US
    # Frozen: the expectation during the surge stays at the pre-surge level, not at 10×.
    before = readings[step_start - 1].baseline
    assert all(abs(r.baseline - before) < 0.15 * before for r in readings[step_start : ends[0] + 1])


def test_a_long_surge_ends_against_the_expectation_of_the_hour_it_ends_at():
    # 04:00 → 10:00 on day 3: the usual count triples meanwhile (3 → 15). The frozen
    # expectation must ride the learned daily curve, or the surge never ends.
    counts = list(seasonal_week()[: 3 * DAY])
    step_start, step_end = 2 * DAY + 4 * HOUR, 2 * DAY + 10 * HOUR
    rng = random.Random(4)
    for i in range(step_start, step_end):
        counts[i] = poisson(rng, 10 * daily_mean(i))
    readings = feed(counts)
    assert [i for i, r in enumerate(readings) if r.phase == "start"] == [step_start]
    ends = [i for i, r in enumerate(readings) if r.phase == "end"]
    assert len(ends) == 1 and step_end <= ends[0] <= step_end + PARAMS.end_quiet_buckets


def test_a_step_starting_mid_bucket_is_declared_by_the_next_bucket():
    rng = random.Random(5)
    onset_s = 3600 + 5  # 5 s into a bucket, after an hour at 1 report/s
    points = [(T0 + s * US, poisson(rng, 10.0 if s >= onset_s else 1.0)) for s in range(onset_s + 120)]
    readings = score_series(points)
    onset_bucket = T0 + (onset_s - onset_s % PARAMS.bucket_s) * US
    started = [r.bucket_start_us for r in readings if r.phase == "start"]
    assert started and started[0] in (onset_bucket, onset_bucket + BUCKET_US)


def test_a_lull_shorter_than_the_quiet_run_does_not_split_a_surge():
    quiet_run = PARAMS.end_quiet_buckets
    counts = [5] * (2 * HOUR) + [100] * 5 + [5] * (quiet_run - 1) + [100] * 5 + [5] * quiet_run
    readings = feed(counts)[2 * HOUR :]
    assert [r.phase for r in readings].count("start") == 1
    assert all(r.surging for r in readings[:-1])
    assert readings[-1].phase == "end"


@pytest.mark.parametrize("level", [1.0, 2.0, 5.0, 20.0, 100.0])
def test_a_twentyfold_step_starts_a_surge_in_its_first_bucket(level: float):
    detector = SurgeDetector()
    feed(steady(level, 2 * HOUR), detector=detector)
    (reading,) = detector.observe(T0 + 2 * HOUR * BUCKET_US, 20 * level)
    assert reading.phase == "start"


def test_a_quiet_night_ignores_three_reports_but_not_forty():
    detector = SurgeDetector()
    feed(steady(0.1, 2 * HOUR), detector=detector)
    assert detector.state.level < 0.3
    (three,) = detector.observe(T0 + 2 * HOUR * BUCKET_US, 3)
    assert (three.phase, three.surging) == ("quiet", False)
    (forty,) = detector.observe(T0 + (2 * HOUR + 1) * BUCKET_US, 40)
    assert (forty.phase, forty.surging) == ("start", True)
    assert detector.surge_started_us == forty.bucket_start_us


@pytest.mark.parametrize(("min_count", "starts"), [(10, False), (5, True)])
def test_min_count_alone_can_hold_back_a_high_score(min_count: float, starts: bool):
    params = SurgeParams(floor=0.1, min_count=min_count)
    detector = SurgeDetector(params)
    feed(steady(0.1, 2 * HOUR), params, detector)
    (nine,) = detector.observe(T0 + 2 * HOUR * BUCKET_US, 9)
    assert nine.score >= params.start_score
    assert nine.surging is starts


@pytest.mark.parametrize(("warmup", "starts_early"), [(PARAMS.warmup_buckets, False), (0, True)])
def test_no_surge_starts_during_warm_up(warmup: int, starts_early: bool):
    counts = steady(2.0, 3 * PARAMS.warmup_buckets)
    counts[10] = 100  # inside the warm-up
    counts[2 * PARAMS.warmup_buckets] = 100  # after it
    readings = feed(counts, SurgeParams(warmup_buckets=warmup))
    assert readings[10].surging is starts_early
    assert not any(r.phase == "start" for r in readings[11:warmup])
    assert readings[2 * PARAMS.warmup_buckets].phase in ("start", "update")


def test_a_gap_is_fed_as_zero_buckets_and_order_is_enforced():
    detector = SurgeDetector()
    assert len(detector.observe(T0, 4)) == 1
    readings = detector.observe(T0 + 5 * BUCKET_US, 7)
    assert [r.bucket_start_us for r in readings] == [T0 + i * BUCKET_US for i in range(1, 6)]
    assert [r.count for r in readings] == [0, 0, 0, 0, 7]
    for bad in (T0 + 5 * BUCKET_US, T0 + 3 * BUCKET_US):
        with pytest.raises(ValueError, match="not after the last one"):
            detector.observe(bad, 1)
    with pytest.raises(ValueError, match="multiple of bucket_s"):
        detector.observe(T0 + 6 * BUCKET_US + 1, 1)
    with pytest.raises(ValueError, match="finite number"):
        detector.observe(T0 + 6 * BUCKET_US, -1)
    assert detector.state.last_bucket_us == T0 + 5 * BUCKET_US  # a refused bucket leaves no trace


def test_dump_and_load_continue_exactly_like_an_uninterrupted_detector():
    counts = list(seasonal_week()[: 2 * DAY])
    for i in range(DAY + 100, DAY + 160):  # a surge that spans the restart
        counts[i] *= 15
    split = DAY + 130
    uninterrupted = feed(counts)

    first = SurgeDetector()
    feed(counts[:split], detector=first)
    assert first.surging
    restored = SurgeDetector.load(first.dump(), PARAMS)
    assert restored.surge_started_us == first.surge_started_us
    assert feed(counts[split:], detector=restored, first=split) == uninterrupted[split:]
    # The state is plain data for a Faust table, and rebuilding from it is the same as load().
    state = msgspec.json.decode(msgspec.json.encode(first.state), type=DetectorState)
    assert SurgeDetector(PARAMS, state).dump() == first.dump()


def test_a_state_saved_with_another_profile_size_is_refused():
    with pytest.raises(ValueError, match="48 slots but the parameters ask for 24"):
        SurgeDetector.load(SurgeDetector().dump(), SurgeParams(season_slots=24))


def test_score_series_sums_points_into_buckets_and_zero_fills():
    points = [(T0 + 1 * US, 2.0), (T0 + 9 * US, 3.0), (T0 + 10 * US, 1.0), (T0 + 45 * US, 4.0), (T0 + 49_999_999, 1.0)]
    readings = score_series(points)
    assert [(r.bucket_start_us - T0) // US for r in readings] == [0, 10, 20, 30, 40]
    assert [r.count for r in readings] == [5.0, 1.0, 0.0, 0.0, 5.0]
    by_hand = SurgeDetector()
    assert readings == by_hand.observe(T0, 5.0) + by_hand.observe(T0 + 10 * US, 1.0) + by_hand.observe(T0 + 40 * US, 5.0)
    assert score_series([]) == []
    with pytest.raises(ValueError, match="sort the points"):
        score_series([(T0 + 15 * US, 1.0), (T0 + 5 * US, 1.0)])


def test_distinct_sketch_is_exact_below_k_and_ignores_duplicates():
    sketch = DistinctSketch(k=256)
    for _ in range(3):
        for i in range(200):
            sketch.add(f"user-{i}")
    assert sketch.estimate() == 200


def test_distinct_sketch_estimates_a_hundred_thousand_within_15_percent():
    sketch = DistinctSketch(k=256)
    for i in range(100_000):
        sketch.add(f"user-{i}")
    assert len(sketch.hashes) == 256
    assert abs(sketch.estimate() - 100_000) <= 15_000


def test_distinct_sketch_merge_equals_the_sketch_of_the_union():
    left, right, union = DistinctSketch(), DistinctSketch(), DistinctSketch()
    for i in range(0, 6_000):
        left.add(f"u{i}")
    for i in range(4_000, 10_000):
        right.add(f"u{i}")
    for i in range(10_000):
        union.add(f"u{i}")
    left.merge(right)
    assert left.hashes == union.hashes
    assert DistinctSketch(256, union.hashes).estimate() == union.estimate()  # restore from hashes
    with pytest.raises(ValueError, match="k=64"):
        left.merge(DistinctSketch(k=64))


@pytest.mark.parametrize("level", [0.1, 2.0, 20.0, 2_000.0])
def test_score_is_within_0_and_1_and_monotone_in_count(level: float):
    detector = SurgeDetector()
    feed(steady(level, 2 * HOUR), detector=detector)
    saved, next_bucket = detector.dump(), T0 + 2 * HOUR * BUCKET_US
    counts = [level * x / 8 for x in range(0, 8 * 30)] + [float(c) for c in range(0, 200)]
    scores = []
    for count in sorted(counts):
        (reading,) = SurgeDetector.load(saved).observe(next_bucket, count)
        scores.append(reading.score)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(a <= b for a, b in zip(scores, scores[1:]))
    assert scores[0] == 0.0 and scores[-1] > PARAMS.start_score  # the range covers both ends


def test_a_wobble_on_a_huge_baseline_scores_zero():
    # z would be ~14 (2·(√1400 − √1000)), but 1.4× is below min_ratio: not a surge.
    assert surge_score(1_400.0, 1_000.0, PARAMS) == 0.0
    assert surge_score(1_600.0, 1_000.0, PARAMS) > PARAMS.start_score


def test_inconsistent_parameters_are_refused_with_their_names():
    with pytest.raises(ValueError, match="end_score ≤ start_score"):
        SurgeParams(start_score=0.5, end_score=0.7)


def test_one_noisy_bucket_on_the_way_down_does_not_restart_the_end_of_a_surge():
    """After an outage a single Poisson-tail bucket (above the quiet line, far below a start)
    must not push the end — and so the incident's resolution — a whole quiet run later."""
    quiet_run = PARAMS.end_quiet_buckets
    counts = [5] * (2 * HOUR) + [100] * 5 + [5] * 2 + [14] + [5] * quiet_run
    readings = feed(counts)[2 * HOUR:]
    spike = readings[5 + 2]
    assert PARAMS.end_score <= spike.score < PARAMS.start_score, spike.score
    ends = [i for i, r in enumerate(readings) if r.phase == "end"]
    assert ends == [5 + quiet_run - 1], [r.phase for r in readings]
