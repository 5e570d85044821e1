"""Surge detection for one dimension value: pure, deterministic, O(1) per bucket.

A detector receives the count of failed requests / fault reports of one dimension value
(say ``service=payment``) per closed bucket of ``bucket_s`` seconds, in event-time order,
and says whether that value is in a sudden surge. The Faust agent keeps one detector per
value and stores :attr:`SurgeDetector.state` in a table; :func:`score_series` runs the
same code over a recorded series.

The maths, per bucket ``t`` with count ``c``
--------------------------------------------
1. **Level** ``L``: an EWMA of the learned counts with half-life ``level_half_life_s``,
   ``α = 1 − 2^(−bucket_s / level_half_life_s)``. Every EWMA here starts as a running
   mean (weight ``max(1/n, α)``) so its first updates do not drag it towards 0.
2. **Daily profile** ``P``: ``season_slots`` time-of-day slots (UTC; only the 24-h
   period matters, not the time zone). Each slot is the mean count of the buckets learned
   in it, an EWMA with half-life ``season_half_life_days``. A slot is *trusted* once it
   learned as many buckets as one day holds of it. ``P(t)`` interpolates linearly between
   the two slot centres around ``t`` (a smooth daily curve without a staircase) and
   exists only when both slots are trusted.
3. **Baseline** ``B = max(P(t) + D, 0)`` when ``P(t)`` exists, else ``B = L``. ``D`` is
   an EWMA, with the level's half-life, of ``count − P(t)``: how today differs from the
   usual day right now (a holiday, a growing customer base). This is the additive
   Holt–Winters split into a season and a short-term level. The profile knows the hour,
   which matters most after a long surge: the frozen ``D`` still rides on the daily curve,
   so a surge that began at 04:00 ends at 10:00 against the 10:00 expectation, where a
   frozen plain level would still expect 04:00 traffic and never let it end.
4. **Expected** ``E = max(B, floor)``.
5. **Score**: ``z = 2·(√c − √E)``, the Anscombe (variance-stabilised) Poisson deviation.
   Unlike ``(c − E)/√E`` its tail stays close to a normal one at small ``E``, where the
   plain Poisson z fires on a dozen reports over a baseline of two. Then
   ``score = 1 − 2^(−max(z, 0) / z_half)`` (0 at or below expectation, 0.5 at
   ``z = z_half``, → 1), and ``score = 0`` whenever ``c < min_ratio·E``: on a
   dimension with a huge baseline, a statistically clear wobble of a few percent is not
   a surge. The score is monotone (non-decreasing) in ``c`` for a given ``E``.
6. **Surge state**, with hysteresis: a quiet detector starts a surge (phase ``start``)
   on a bucket with ``score ≥ start_score`` and ``c ≥ min_count``, once
   ``warmup_buckets`` buckets were seen. A surging detector ends it (phase ``end``) at
   the ``end_quiet_buckets``-th consecutive bucket with ``score < end_score``; any
   bucket at or above ``end_score`` resets that run (phase ``update``).
7. **Freeze**: a bucket is learned (``L``, ``D`` and ``P``) only if the detector is not surging after
   it. A long outage therefore never becomes "normal"; the expectation still follows the
   learned daily profile while frozen. A surge that never ends (a permanent new error
   level) stays open: it needs a human, not a detector that quietly gets used to it.

Parameters (:class:`SurgeParams`)
---------------------------------
=====================  =======  ===============================================================
name                   default  meaning and why
=====================  =======  ===============================================================
bucket_s               10       bucket width in seconds; every ``*_count``/``floor`` is per bucket
level_half_life_s      600      half-life of ``L`` and ``D``. 10 min follows a daily curve with
                                about half a count of lag (night 10 % of a peak of 20) yet a
                                one-bucket step moves it by only 1 %
season_slots           48       time-of-day slots (30 min): 180 buckets a day each, enough for a
                                stable mean; interpolation removes the staircase
season_half_life_days  3.0      memory of the daily profile: adapts to a changed pattern within
                                days, one odd day moves it by ~20 %
floor                  1.0      minimum expected count per bucket: where the baseline is ~0 every
                                count looks huge in ratio and z; 3 reports at 4 a.m. over 0.1
                                are 30× but noise, not an outage
min_count              10       a bucket needs at least this many counts to start a surge: a
                                business guard independent of the statistics. With the other
                                defaults the score already needs 13 over E = 1; it binds when
                                ``floor`` or ``start_score`` are lowered
min_ratio              1.5      the count must be ≥ this × expected to score above 0: stops
                                huge-baseline values firing on small relative wobbles
z_half                 2.5      the z at which the score is 0.5; sets the scale of the score
start_score            0.75     score to start a surge (z = 5): a Poisson noise bucket reaches
                                it with probability 10⁻¹⁰ (E = 1) to 3·10⁻⁸ (E = 20); a 20× step
                                over E ≥ 1, or 30 counts over ~1, passes it in its first bucket
end_score              0.5      a bucket below this (z = 2.5) is quiet; lower than the start
                                (hysteresis) so a surge does not flap on its way down
end_quiet_buckets      6        consecutive quiet buckets that end a surge: 1 min, long enough
                                to ride out a lull in an outage, short enough for the report
warmup_buckets         90       buckets seen before any surge may start: 15 min ≈ 1/α, the time
                                the level needs to mean something
=====================  =======  ===============================================================

Everything is deterministic: no wall clock, no randomness, and the state is plain data
(:class:`DetectorState`, msgspec JSON via :meth:`SurgeDetector.dump` / ``load``).
:class:`DistinctSketch` counts distinct affected users in bounded memory.
"""

from __future__ import annotations

from functools import lru_cache

import bisect
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

_US_PER_S = 1_000_000
_DAY_US = 86_400 * _US_PER_S

Phase = Literal["quiet", "start", "update", "end"]


@dataclass(frozen=True)
class SurgeParams:
    """Tuning of a :class:`SurgeDetector`; meanings, defaults and reasons in the module docstring.

    Raises ValueError on construction if a value is out of its range.
    """

    bucket_s: int = 10
    level_half_life_s: float = 600.0
    season_slots: int = 48
    season_half_life_days: float = 3.0
    floor: float = 1.0
    min_count: float = 10.0
    min_ratio: float = 1.5
    z_half: float = 2.5
    start_score: float = 0.75
    end_score: float = 0.5
    end_quiet_buckets: int = 6
    warmup_buckets: int = 90

    def __post_init__(self) -> None:
        problems = [
            problem
            for problem, ok in (
                ("bucket_s must be ≥ 1", self.bucket_s >= 1),
                ("level_half_life_s must be > 0", self.level_half_life_s > 0),
                ("season_slots must be ≥ 1", self.season_slots >= 1),
                ("season_half_life_days must be > 0", self.season_half_life_days > 0),
                ("floor must be > 0", self.floor > 0),
                ("min_count must be ≥ 0", self.min_count >= 0),
                ("min_ratio must be ≥ 1", self.min_ratio >= 1),
                ("z_half must be > 0", self.z_half > 0),
                ("need 0 < end_score ≤ start_score < 1", 0 < self.end_score <= self.start_score < 1),
                ("end_quiet_buckets must be ≥ 1", self.end_quiet_buckets >= 1),
                ("warmup_buckets must be ≥ 0", self.warmup_buckets >= 0),
            )
            if not ok
        ]
        if problems:
            raise ValueError(f"invalid surge parameters: {'; '.join(problems)}")


class Reading(msgspec.Struct, frozen=True):
    """The verdict on one bucket. ``surging`` and ``phase`` describe the state after it."""

    bucket_start_us: int
    count: float
    baseline: float  # expected count for this bucket, before the floor
    score: float  # in [0, 1]
    surging: bool
    phase: Phase


class DetectorState(msgspec.Struct):
    """Everything a detector remembers. Plain data: msgspec-serialisable as is.

    ``season_mean``/``season_n`` are empty until the detector first sizes them to
    ``season_slots``.
    """

    last_bucket_us: int | None = None
    buckets_seen: int = 0
    level: float = 0.0
    level_n: int = 0  # buckets learned by the level (drives its running-mean start)
    deviation: float = 0.0  # D: EWMA of count − P(t) over buckets where the profile exists
    deviation_n: int = 0
    season_mean: list[float] = msgspec.field(default_factory=list)
    season_n: list[int] = msgspec.field(default_factory=list)
    surging: bool = False
    surge_started_us: int | None = None
    quiet_run: int = 0  # consecutive quiet buckets while surging
    last_score: float = 0.0  # of the previous bucket while surging (the end is debounced)


def surge_score(count: float, expected: float, params: SurgeParams) -> float:
    """Score in [0, 1] of ``count`` against ``expected`` (> 0); non-decreasing in ``count``."""
    if count < params.min_ratio * expected:
        return 0.0
    z = 2.0 * (math.sqrt(count) - math.sqrt(expected))  # ≥ 0: min_ratio ≥ 1 keeps count ≥ expected here
    return 1.0 - 2.0 ** (-z / params.z_half)


def _copy_state(state: DetectorState) -> DetectorState:
    # The lists are the only mutable parts; copying them keeps callers and detector apart.
    return msgspec.structs.replace(state, season_mean=list(state.season_mean), season_n=list(state.season_n))


class SurgeDetector:
    """The surge state machine of one dimension value (see the module docstring)."""

    def __init__(self, params: SurgeParams = SurgeParams(), state: DetectorState | None = None) -> None:
        """Start fresh, or continue from ``state`` (copied).

        Raises ValueError if ``state`` holds a profile of another size than ``params.season_slots``.
        """
        self._params = params
        self._state = _copy_state(state) if state is not None else DetectorState()
        slots = params.season_slots
        if not self._state.season_mean and not self._state.season_n:
            self._state.season_mean = [0.0] * slots
            self._state.season_n = [0] * slots
        elif len(self._state.season_mean) != slots or len(self._state.season_n) != slots:
            raise ValueError(
                f"detector state has a daily profile of {len(self._state.season_mean)} slots but the parameters "
                f"ask for {slots}; load it with the parameters it was saved with, or start a fresh detector"
            )
        # Constants of the per-bucket maths, computed once: observe() runs millions of times offline.
        self._bucket_us = params.bucket_s * _US_PER_S
        self._level_alpha = 1.0 - 2.0 ** (-params.bucket_s / params.level_half_life_s)
        self._slot_us = _DAY_US / slots  # µs per time-of-day slot
        slot_buckets_per_day = 86_400 / (slots * params.bucket_s)
        self._season_alpha = 1.0 - 2.0 ** (-1.0 / (params.season_half_life_days * slot_buckets_per_day))
        self._slot_trusted_after = max(1, math.ceil(slot_buckets_per_day))
        # Past these many updates max(1/n, α) is α: a comparison instead of a division per bucket.
        self._level_mean_until = math.ceil(1.0 / self._level_alpha)
        self._season_mean_until = math.ceil(1.0 / self._season_alpha)

    @property
    def params(self) -> SurgeParams:
        return self._params

    @property
    def state(self) -> DetectorState:
        """A copy of the state: store it, then rebuild with ``SurgeDetector(params, state)``."""
        return _copy_state(self._state)

    @property
    def surging(self) -> bool:
        return self._state.surging

    @property
    def surge_started_us(self) -> int | None:
        """Start of the current surge's first bucket, None when quiet."""
        return self._state.surge_started_us

    def observe(self, bucket_start_us: int, count: float) -> list[Reading]:
        """Feed one closed bucket. Buckets must come in increasing order; a bucket after a gap first
        feeds the missing buckets as zero counts (they are returned too, so the list may be longer than 1).

        Raises ValueError, leaving the state untouched, for a bucket at or before the last one, a bucket
        start that is not a multiple of ``bucket_s``, or a count that is negative or not finite.
        """
        self._check(bucket_start_us, count)
        last = self._state.last_bucket_us
        if last is None or bucket_start_us == last + self._bucket_us:
            return [self._step(bucket_start_us, float(count))]  # the usual case, kept lean
        step = self._bucket_us
        readings = [self._step(missing, 0.0) for missing in range(last + step, bucket_start_us, step)]
        readings.append(self._step(bucket_start_us, float(count)))
        return readings

    def dump(self) -> bytes:
        """The state as msgspec JSON."""
        return msgspec.json.encode(self._state)

    @classmethod
    def load(cls, data: bytes, params: SurgeParams = SurgeParams()) -> SurgeDetector:
        """A detector continuing from :meth:`dump` output.

        Raises msgspec.DecodeError if ``data`` is not a detector state, ValueError as ``__init__``.
        """
        return cls(params, msgspec.json.decode(data, type=DetectorState))

    def _check(self, bucket_start_us: int, count: float) -> None:
        if bucket_start_us % self._bucket_us:
            raise ValueError(
                f"bucket start {bucket_start_us} µs is not a multiple of bucket_s={self._params.bucket_s} s; "
                f"floor it to the bucket boundary (or use score_series for raw timestamps)"
            )
        last = self._state.last_bucket_us
        if last is not None and bucket_start_us <= last:
            raise ValueError(
                f"bucket {bucket_start_us} µs is not after the last one ({last} µs): buckets must be fed "
                f"once each, in increasing order"
            )
        if not (count >= 0 and math.isfinite(count)):
            raise ValueError(f"count {count!r} for bucket {bucket_start_us} µs must be a finite number ≥ 0")

    def _step(self, bucket_start_us: int, count: float) -> Reading:
        """Score one bucket, advance the surge state, learn from it unless surging."""
        s = self._state
        # Where the bucket's middle falls in the day, in slot widths: [0, season_slots).
        slot_pos = (bucket_start_us + self._bucket_us // 2) % _DAY_US / self._slot_us
        seasonal = self._seasonal(slot_pos)
        baseline = s.level if seasonal is None else max(seasonal + s.deviation, 0.0)
        score = surge_score(count, max(baseline, self._params.floor), self._params)
        phase = self._advance(bucket_start_us, count, score)
        s.buckets_seen += 1
        s.last_bucket_us = bucket_start_us
        if not s.surging:
            self._learn(slot_pos, count, seasonal)
        return Reading(bucket_start_us, count, baseline, score, s.surging, phase)

    def _seasonal(self, slot_pos: float) -> float | None:
        """P(t), or None while either slot around t is untrusted."""
        s = self._state
        # Slot centres sit at i + 0.5; interpolate between the two around us. Adding a whole
        # day of slots keeps the position positive, so int() is floor().
        slots = self._params.season_slots
        position = slot_pos + (slots - 0.5)
        left = int(position)
        frac = position - left
        left %= slots
        right = (left + 1) % slots
        trusted = self._slot_trusted_after
        if s.season_n[left] < trusted or s.season_n[right] < trusted:
            return None
        return (1.0 - frac) * s.season_mean[left] + frac * s.season_mean[right]

    def _advance(self, bucket_start_us: int, count: float, score: float) -> Phase:
        s, p = self._state, self._params
        if s.surging:
            # Quiet is judged on the mean score of this bucket and the one before: one noisy
            # bucket after an outage (a Poisson tail) does not restart the count to its end;
            # a bucket that would start a surge on its own always does.
            quiet = (score + s.last_score) / 2 < p.end_score and score < p.start_score
            s.quiet_run = s.quiet_run + 1 if quiet else 0
            s.last_score = score
            if s.quiet_run < p.end_quiet_buckets:
                return "update"
            s.surging, s.surge_started_us, s.quiet_run = False, None, 0
            return "end"
        if s.buckets_seen >= p.warmup_buckets and count >= p.min_count and score >= p.start_score:
            s.surging, s.surge_started_us, s.quiet_run, s.last_score = True, bucket_start_us, 0, score
            return "start"
        return "quiet"

    def _learn(self, slot_pos: float, count: float, seasonal: float | None) -> None:
        s = self._state
        n = s.level_n = s.level_n + 1
        alpha = 1.0 / n if n < self._level_mean_until else self._level_alpha
        s.level += alpha * (count - s.level)
        if seasonal is not None:
            n = s.deviation_n = s.deviation_n + 1
            alpha = 1.0 / n if n < self._level_mean_until else self._level_alpha
            s.deviation += alpha * (count - seasonal - s.deviation)
        slot = min(int(slot_pos), self._params.season_slots - 1)  # min(): a float edge must not index past the day
        n = s.season_n[slot] = s.season_n[slot] + 1
        alpha = 1.0 / n if n < self._season_mean_until else self._season_alpha
        s.season_mean[slot] += alpha * (count - s.season_mean[slot])


def score_series(points: Iterable[tuple[int, float]], params: SurgeParams = SurgeParams()) -> list[Reading]:
    """Offline: (timestamp_us, count) points in time order, at any timestamps; they are summed into
    buckets of params.bucket_s (empty buckets are zero) and scored. One Reading per bucket, from the
    first point's bucket to the last one's; no points, no readings.

    Raises ValueError if a point falls in a bucket before the previous point's, or as ``observe``.
    """
    detector = SurgeDetector(params)
    bucket_us = params.bucket_s * _US_PER_S
    readings: list[Reading] = []
    current: int | None = None
    total = 0.0
    for timestamp_us, count in points:
        bucket = timestamp_us - timestamp_us % bucket_us
        if current is not None and bucket != current:
            if bucket < current:
                raise ValueError(
                    f"point at {timestamp_us} µs comes after one in a later bucket ({current} µs): "
                    f"sort the points by time first"
                )
            readings += detector.observe(current, total)
            total = 0.0
        current = bucket
        total += count
    if current is not None:
        readings += detector.observe(current, total)
    return readings


_HASH_SPACE = 2**64


@lru_cache(maxsize=65_536)
def item_hash(item: str) -> int:
    """The 64-bit hash a sketch keeps of ``item`` (cached: a user sends many requests)."""
    return _hash64(item)


def _hash64(item: str) -> int:
    # blake2b, not hash(): the value must be the same in every process for merged/stored sketches.
    return int.from_bytes(hashlib.blake2b(item.encode("utf-8"), digest_size=8).digest(), "big")


class DistinctSketch:
    """Distinct count in bounded memory: a K-minimum-values sketch.

    It keeps the ``k`` smallest distinct 64-bit hashes seen. Below ``k`` distinct items the
    count is exact; above, the estimate is ``(k − 1) / u`` with ``u`` the k-th smallest hash
    as a fraction of the hash space, relative standard error ≈ ``1/√(k − 2)`` (6 % at 256).
    Sketches merge exactly: the merge of two equals the sketch of the union of their items.
    """

    def __init__(self, k: int = 256, hashes: list[int] | None = None) -> None:
        """``hashes`` restores a sketch from :attr:`hashes`. Raises ValueError for k < 2 or a hash
        outside [0, 2⁶⁴)."""
        if k < 2:
            raise ValueError(f"a distinct sketch needs k ≥ 2, got {k}")
        self._k = k
        restored = sorted(set(hashes or ()))
        if restored and not (0 <= restored[0] and restored[-1] < _HASH_SPACE):
            raise ValueError("sketch hashes must be 64-bit unsigned integers; was it saved by DistinctSketch.hashes?")
        self._hashes: list[int] = restored[:k]

    @property
    def k(self) -> int:
        return self._k

    @property
    def hashes(self) -> list[int]:
        """The kept hashes, ascending (a copy), for serialisation."""
        return list(self._hashes)

    def add(self, item: str) -> None:
        self._insert(_hash64(item))

    def add_hash(self, hashed: int) -> None:
        """Add an item by its :func:`item_hash` (one hash for an item added to many sketches)."""
        self._insert(hashed)

    def merge(self, other: DistinctSketch) -> None:
        """Fold ``other`` into this sketch. Raises ValueError if the two have different ``k``:
        the merge would no longer be the sketch of the union."""
        if other.k != self._k:
            raise ValueError(f"cannot merge a sketch of k={other.k} into one of k={self._k}; use one k everywhere")
        for h in other._hashes:
            self._insert(h)

    def estimate(self) -> int:
        kept = len(self._hashes)
        if kept < self._k:
            return kept
        return round((self._k - 1) * _HASH_SPACE / (self._hashes[-1] + 1))

    def _insert(self, h: int) -> None:
        kept = self._hashes
        if len(kept) >= self._k and h >= kept[-1]:
            return  # the common case once full: not among the k smallest
        i = bisect.bisect_left(kept, h)
        if i < len(kept) and kept[i] == h:
            return  # a duplicate
        kept.insert(i, h)
        if len(kept) > self._k:
            kept.pop()
