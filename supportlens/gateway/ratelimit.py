"""How fast each client app may send: one token bucket per app, on an injected monotonic clock.

A request costs one token, whatever it carries. The limit is checked before the body is
read, so a refused request costs the gateway almost nothing, and it is what a client
developer can predict (an OTLP exporter sends one request per batch); records per request
are already bounded by ``max_record_bytes``. Limits hold per gateway process: behind a
load balancer with N gateways an app may send up to N times its rate.

Nothing here does I/O or reads a clock of its own, so tests drive time by hand.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """``per_s`` requests per second on average, up to ``burst`` at once; ``per_s == 0``: no limit."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_s < 0 or self.burst < 1:
            raise ValueError(f"a rate limit needs per_s >= 0 and burst >= 1, got {self.per_s} and {self.burst}")

    @property
    def unlimited(self) -> bool:
        return self.per_s == 0

    def describe(self) -> str:
        """For people: ``50 requests/s (bursts of 200)`` or ``no limit``."""
        if self.unlimited:
            return "no limit"
        return f"{self.per_s:,.10g} requests/s (bursts of {self.burst:,})"


class TokenBucket:
    """``burst`` tokens to start with, refilled at ``per_s`` a second up to ``burst``; a request takes one."""

    __slots__ = ("_limit", "_tokens", "_updated")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self._limit = limit
        self._tokens = float(limit.burst)
        self._updated = now

    def take(self, now: float) -> float:
        """Take a token at ``now`` (seconds on a monotonic clock): ``0.0`` when one was there,
        else the seconds until one will be (and nothing is taken)."""
        if self._limit.unlimited:
            return 0.0
        elapsed = max(0.0, now - self._updated)  # a clock that steps back refills nothing
        self._tokens = min(float(self._limit.burst), self._tokens + elapsed * self._limit.per_s)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._limit.per_s


class RateLimiter:
    """One bucket per app, made up front from a fixed list: memory does not grow with traffic."""

    def __init__(self, limits: Mapping[str, RateLimit], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._limits = dict(limits)
        self._buckets = {app: TokenBucket(limit, now) for app, limit in limits.items()}

    def limit_of(self, app: str) -> RateLimit:
        return self._limits[app]

    def admit(self, app: str) -> float:
        """``0.0`` when ``app`` may send now, else the seconds it has to wait. Raises ``KeyError``
        for an app that is not in the list (the caller authenticated it against the same list)."""
        return self._buckets[app].take(self._clock())


def retry_after_s(wait_s: float) -> int:
    """``Retry-After`` in whole seconds (RFC 9110 allows no fractions): rounded up, at least 1."""
    return max(1, math.ceil(wait_s))
