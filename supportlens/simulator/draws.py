"""Random draws the simulator's parts share (pure, on a given ``random.Random``)."""

from __future__ import annotations

import math
import random


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw of mean ``lam`` (Knuth's method; the normal approximation above 50,
    where exact sampling is slow and indistinguishable)."""
    if lam <= 0:
        return 0
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
