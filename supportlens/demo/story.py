"""What the demo's day came to, from the pipeline's own outputs (pure).

Per expected outage: the incident the policy declared for it (matched by the outage's
dimensions and its window), the surge that started it, how long after the fault began it
was declared and how long after the fault ended its end was announced, and which accounts
heard of it. :func:`problems` names every way the day differs from what the scenarios expect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from supportlens.contracts import DeliveryAttempt, IncidentEvent, Notification, SurgeEvent
from supportlens.incident_desk import current_incidents
from supportlens.simulator.labels import IncidentWindow

DECLARE_WITHIN_S = 30  # of the fault's start, in event time
POLICY = "policy"
US = 1_000_000


@dataclass(frozen=True)
class OutageStory:
    window: IncidentWindow
    declared: IncidentEvent | None = None
    latest: IncidentEvent | None = None
    resolved: IncidentEvent | None = None
    surge: SurgeEvent | None = None  # the start of the surge on the incident's root
    told: Counter[str] = field(default_factory=Counter)  # account -> "declared" notices
    followed_up: Counter[str] = field(default_factory=Counter)  # account -> "resolved" notices

    @property
    def declared_after_s(self) -> float | None:
        return None if self.declared is None else (self.declared.at_us - self.window.start_us) / US

    @property
    def resolved_after_s(self) -> float | None:
        return None if self.resolved is None else (self.resolved.at_us - self.window.end_us) / US

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.window.scenario, "expected_dimension": self.window.dimension,
            "fault_start_us": self.window.start_us, "fault_end_us": self.window.end_us,
            "incident_id": self.declared.incident_id if self.declared else None,
            "root_key": self.latest.root_key if self.latest else None,
            "dimensions": self.latest.dimensions if self.latest else {},
            "rule": self.declared.reason if self.declared else None,
            "declared_after_s": self.declared_after_s, "resolved_after_s": self.resolved_after_s,
            "told": sorted(self.told), "followed_up": sorted(self.followed_up),
        }


def outage_story(window: IncidentWindow, incidents: Sequence[IncidentEvent], surges: Sequence[SurgeEvent],
                 notices: Sequence[Notification]) -> OutageStory:
    """The policy incident declared for one outage: the first one, not a drill, whose dimensions
    hold the outage's and which began between a minute before the fault and its end."""
    latest = {event.incident_id: event for event in current_incidents(incidents)}
    candidates = [e for e in incidents if e.transition == "declared" and not e.drill and e.declared_by == POLICY
                  and window.start_us - 60 * US <= e.started_at_us <= window.end_us
                  and window.dimension.items() <= latest[e.incident_id].dimensions.items()]
    if not candidates:
        return OutageStory(window)
    declared = min(candidates, key=lambda e: e.at_us)
    incident_id = declared.incident_id
    resolved = next((e for e in incidents if e.incident_id == incident_id and e.transition == "resolved"), None)
    root = latest[incident_id].root_key
    surge = next((s for s in surges if s.phase == "start" and s.kind == "surge" and not s.drill
                  and f"{s.dimension}={s.value}" == root
                  and s.started_at_us >= declared.started_at_us - 60 * US), None)
    mine = [n for n in notices if n.incident_id == incident_id]
    return OutageStory(window, declared, latest[incident_id], resolved, surge,
                       Counter(n.account_id for n in mine if n.kind == "incident_declared"),
                       Counter(n.account_id for n in mine if n.kind == "incident_resolved"))


def outage_problems(story: OutageStory) -> list[str]:
    name = story.window.scenario
    expected = ", ".join(f"{k}={v}" for k, v in story.window.dimension.items())
    if story.declared is None:
        return [f"{name}: no incident on {expected} was declared"]
    problems = []
    after = story.declared_after_s or 0.0
    if not 0 <= after <= DECLARE_WITHIN_S:
        problems.append(f"{name}: declared {after:.0f} s after the fault began (expected within {DECLARE_WITHIN_S} s)")
    if story.resolved is None:
        problems.append(f"{name}: {story.declared.incident_id} was not resolved")
    if not story.told:
        problems.append(f"{name}: no VIP account was notified")
    twice = [a for a, n in story.told.items() if n > 1]
    if twice:
        problems.append(f"{name}: {len(twice)} accounts were told twice ({', '.join(sorted(twice)[:3])})")
    if story.resolved is not None and set(story.followed_up) != set(story.told):
        problems.append(f"{name}: {len(story.followed_up)} follow-ups for {len(story.told)} notified accounts")
    return problems


def unexpected_incidents(incidents: Sequence[IncidentEvent], stories: Sequence[OutageStory]) -> list[IncidentEvent]:
    """Policy declarations (not drills) that no expected outage explains: the quiet night's, a misuse wave's."""
    explained = {s.declared.incident_id for s in stories if s.declared}
    return [e for e in incidents if e.transition == "declared" and not e.drill and e.declared_by == POLICY
            and e.incident_id not in explained]


@dataclass(frozen=True)
class Deliveries:
    """Final outcomes per notification, from ``deliveries``."""

    final: dict[str, str]  # notification id -> outcome

    @classmethod
    def of(cls, attempts: Sequence[DeliveryAttempt]) -> Deliveries:
        final = {a.notification_id: a.outcome for a in attempts if a.outcome != "failed"}
        return cls(final)

    def pending(self, notices: Sequence[Notification]) -> list[Notification]:
        return [n for n in notices if n.notification_id not in self.final]


def mark(ok: bool) -> str:
    """A judged fact on screen."""
    return "[green]✓[/]" if ok else "[red]✗[/]"
