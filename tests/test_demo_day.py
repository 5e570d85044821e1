"""The demo's day and how its outcome is judged (pure parts of `supportlens demo`)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from supportlens.contracts import IncidentEvent, Notification
from supportlens.demo.day import DAY_START, plan_day
from supportlens.demo.story import outage_problems, outage_story, unexpected_incidents
from supportlens.simulator.labels import IncidentWindow

US = 1_000_000
START = 1_796_000_000 * US


@pytest.mark.parametrize("now", [datetime(2026, 12, 7, 9, 30, tzinfo=timezone.utc),
                                 datetime(2026, 12, 7, 20, 3, tzinfo=timezone.utc),
                                 datetime(2026, 12, 7, 20, 10, tzinfo=timezone.utc)])
def test_the_day_is_one_line_in_the_past_warm_up_first_then_each_outage_then_the_night(now):
    day = plan_day(now, warmup_s=900, window_s=300)
    assert [s.scenario for s in day] == ["normal", "service-outage", "isp-outage", "bad-release", "misuse-wave",
                                         "quiet-night"]
    assert day[0].start.time() == DAY_START and day[0].duration_s == 900
    assert all(a.end == b.start for a, b in zip(day[:4], day[1:5]))  # back to back: event time never pauses
    assert day[-1].start.hour == 20 and day[-1].start.date() == day[0].start.date()
    assert day[-1].end <= now - timedelta(minutes=1)  # all of it in the past
    assert day[-1].end > now - timedelta(days=1, minutes=10)  # the latest such day


def test_windows_too_long_for_the_daytime_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        plan_day(datetime(2026, 12, 7, 9, 30, tzinfo=timezone.utc), warmup_s=900, window_s=4 * 3600)


WINDOW = IncidentWindow(scenario="service-outage", expected_class="server_error", dimension={"service": "payment"},
                        start_us=START, end_us=START + 150 * US)


def _event(transition: str, sequence: int, at_s: float, incident_id: str = "inc-1", **extra) -> IncidentEvent:
    fields = dict(incident_id=incident_id, sequence=sequence, transition=transition, at_us=START + int(at_s * US),
                  started_at_us=START, severity="sev3", title="t", reason="wide impact", root_key="service=payment",
                  dimensions={"service": "payment", "diagnosis_class": "server_error"})
    return IncidentEvent(**{**fields, **extra})  # type: ignore[arg-type]


def _notice(account: str, kind: str, incident_id: str = "inc-1") -> Notification:
    return Notification(notification_id=f"n-{account}-{kind}", account_id=account, kind=kind,  # type: ignore[arg-type]
                        created_at_us=START, incident_id=incident_id)


def test_an_outage_declared_early_told_once_and_followed_up_has_no_problem():
    events = [_event("declared", 1, 10), _event("mitigated", 2, 200), _event("resolved", 3, 280)]
    notices = [_notice("a", "incident_declared"), _notice("b", "incident_declared"),
               _notice("a", "incident_resolved"), _notice("b", "incident_resolved")]
    story = outage_story(WINDOW, events, [], notices)
    assert story.declared_after_s == 10 and story.resolved_after_s == 130 and set(story.told) == {"a", "b"}
    assert outage_problems(story) == []
    assert unexpected_incidents(events, [story]) == []


def test_every_way_an_outage_can_go_wrong_is_named():
    late = [_event("declared", 1, 45)]
    problems = outage_problems(outage_story(WINDOW, late, [], [_notice("a", "incident_declared")] * 2))
    assert any("45 s after" in p for p in problems) and any("not resolved" in p for p in problems)
    assert any("told twice" in p for p in problems)
    wrong_place = [_event("declared", 1, 10, dimensions={"service": "search"}, root_key="service=search")]
    story = outage_story(WINDOW, wrong_place, [], [])
    assert outage_problems(story) == ["service-outage: no incident on service=payment was declared"]
    assert unexpected_incidents(wrong_place, [story]) == wrong_place  # and it is not explained either
    by_hand = [_event("declared", 1, 10, declared_by="ann")]
    assert outage_story(WINDOW, by_hand, [], []).declared is None  # a person's declaration is not the policy's
