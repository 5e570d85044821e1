"""The demo's day: a past day replayed on one event-time line, compressed (pure).

Ordinary traffic first, long enough for the surge detector's warm-up; then each outage in a
window of its own, back to back, so one outage's end is announced while the next one's
traffic flows; then one customer's misuse; then, the same evening, the quiet night. The
day starts at 07:30 UTC: afternoon in Asia (three of the world's five regions near their
peak, the ISP outage's China Telecom users among them), morning in Europe. The whole day
lies in the past, so its event time never runs ahead of the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone

from supportlens.simulator.scenarios import SCENARIOS

OUTAGES = ("service-outage", "isp-outage", "bad-release")
DAY_START = time(7, 30)
MARGIN = timedelta(minutes=1)  # the night ends at least this long before now


@dataclass(frozen=True)
class Segment:
    scenario: str
    start: datetime
    duration_s: int

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)


def plan_day(now: datetime, warmup_s: int, window_s: int) -> list[Segment]:
    """The day's segments in event-time order: warm-up (``normal``), the outages and the misuse
    wave (``window_s`` each), the quiet night (``window_s`` from its scenario's hour)."""
    night = time(SCENARIOS["quiet-night"].start_hour_utc or 20)
    day = now.astimezone(timezone.utc).date()
    while datetime.combine(day, night, timezone.utc) + timedelta(seconds=window_s) + MARGIN > now:
        day -= timedelta(days=1)
    start = datetime.combine(day, DAY_START, timezone.utc)
    segments = [Segment("normal", start, warmup_s)]
    for name in (*OUTAGES, "misuse-wave"):
        segments.append(Segment(name, segments[-1].end, window_s))
    night_start = datetime.combine(day, night, timezone.utc)
    if segments[-1].end > night_start:
        raise ValueError(f"windows of {window_s} s do not fit between {DAY_START} and the night at {night}")
    segments.append(Segment("quiet-night", night_start, window_s))
    return segments
