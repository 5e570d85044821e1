"""Incident declaration policy and the surge engine, on hand-made surges and partial counts (no Kafka).

Times are seconds after ``T0`` (a bucket boundary); a surge whose first bucket starts at
``b`` is reported at ``b + 10`` (when the bucket closes), as the engine does.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from supportlens.contracts import IncidentCommand, IncidentEvent, SignalClock, SignalCount, SurgeEvent
from supportlens.errors import UserError
from streams.detect import EngineConfig, Outputs, SurgeEngine, dump_engine, load_engine
from streams.incidents import DEFAULT_POLICY_PATH, IncidentBook, ResolveRules, dump_book, load_book, load_policy
from streams.surge import DistinctSketch, SurgeParams

US = 1_000_000
T0 = 1_795_320_000 * US  # a bucket boundary
POLICY = load_policy()
TEAMS = {"payment": "payments", "orders": "commerce", "edge-gateway": "sre"}


def team_of(service: str) -> str:
    return TEAMS.get(service, "unowned")


def new_book() -> IncidentBook:
    return IncidentBook(POLICY, team_of)


def at(seconds: float) -> int:
    return T0 + int(seconds * US)


def surge(phase: str, key: str, started_s: int, at_s: int, users: int, active: int) -> SurgeEvent:
    dimension, value = key.split("=", 1)
    attributes = {"active_users": active}
    if phase == "end":
        # the engine's convention: the six quiet buckets that ended it began a minute earlier
        attributes["quiet_since_us"] = at(at_s - 60)
    return SurgeEvent(surge_id=f"s-{key}@{started_s}".replace(" ", "_"), phase=phase, at_us=at(at_s),  # type: ignore[arg-type]
                      started_at_us=at(started_s), dimension=dimension, value=value, score=0.9,
                      affected_users=users, attributes=attributes)


def start(key: str, bucket_s: int, users: int = 20, active: int = 1000) -> SurgeEvent:
    """A surge whose first bucket starts at ``bucket_s``. 20 of 1000 active users: under
    both wide-impact rules (50 users, 5 %) and above the floor (10)."""
    return surge("start", key, bucket_s, bucket_s + 10, users, active)


def update(key: str, bucket_s: int, at_s: int, users: int = 20, active: int = 1000) -> SurgeEvent:
    return surge("update", key, bucket_s, at_s, users, active)


def end(key: str, bucket_s: int, at_s: int, users: int = 20, active: int = 1000) -> SurgeEvent:
    return surge("end", key, bucket_s, at_s, users, active)


def transitions(events: list[IncidentEvent]) -> list[str]:
    return [e.transition for e in events]


# ---- declaration --------------------------------------------------------------------------------

def test_a_payment_surge_is_declared_because_its_team_is_needed_not_only_sre():
    [event] = new_book().on_surges([start("service=payment", 0, users=20)])
    assert event.transition == "declared" and event.sequence == 1
    assert event.reason == "team payments is needed, not only SRE (service payment)"
    assert event.root_key == "service=payment"
    assert event.dimensions == {"service": "payment"}
    assert (event.services, event.teams) == (["payment"], ["payments"])
    assert (event.severity, event.affected_users, event.declared_by) == ("sev3", 20, "policy")
    assert (event.started_at_us, event.at_us) == (at(0), at(10))


@pytest.mark.parametrize(("users", "severity"), [(199, "sev3"), (200, "sev2"), (1999, "sev2"), (2000, "sev1")])
def test_severity_follows_the_policy_user_thresholds(users, severity):
    [event] = new_book().on_surges([start("service=payment", 0, users=users, active=10 * users)])
    assert event.severity == severity
    assert f"wide impact: {users} users affected (policy: 50)" in event.reason


def test_an_incident_that_needs_two_teams_is_at_least_sev2():
    [event] = new_book().on_surges([start("service=payment", 0), start("service=orders", 0)])
    assert event.severity == "sev2" and event.teams == ["commerce", "payments"]
    assert "2 teams needed: commerce, payments" in event.reason


def test_an_sre_service_is_declared_for_wide_impact_by_users_or_share_not_below():
    assert new_book().on_surges([start("service=edge-gateway", 0, users=49, active=1000)]) == []
    [by_users] = new_book().on_surges([start("service=edge-gateway", 0, users=50, active=10_000)])
    assert by_users.reason == "wide impact: 50 users affected (policy: 50)"
    [by_share] = new_book().on_surges([start("service=edge-gateway", 0, users=49, active=980)])
    assert by_share.reason == "wide impact: 5% of the active users of service edge-gateway affected (policy: 5%)"


def test_a_small_sre_surge_is_declared_only_once_unresolved_for_an_hour():
    book = new_book()
    key = "service=edge-gateway"
    assert book.on_surges([start(key, 0)]) == []
    for at_s in range(20, 3600, 10):  # the engine: time first, then the bucket's surges
        assert book.on_time(at(at_s)) == []
        assert book.on_surges([update(key, 0, at_s)]) == []
    [event] = book.on_time(at(3600))
    assert event.transition == "declared" and "unresolved after 60 minutes" in event.reason
    assert (event.root_key, event.teams, event.severity) == (key, ["sre"], "sev3")


def test_below_the_floor_nothing_is_declared_even_for_a_team_other_than_sre_or_after_an_hour():
    book = new_book()
    assert book.on_surges([start("service=payment", 0, users=9, active=10)]) == []  # 90 %, but 9 users
    assert book.on_time(at(2 * 3600)) == []
    [event] = new_book().on_surges([start("service=payment", 0, users=10, active=10)])
    assert event.transition == "declared"


def test_a_wave_of_client_misuse_alone_is_advice_not_an_incident_but_misuse_beside_a_failure_is_one():
    # one customer's integration calling wrongly, seen wide: in its class, its platform, its service
    wave = [start("diagnosis_class=client_misuse", 0, users=60, active=1000),
            start("platform=web", 0, users=60, active=1000), start("service=orders", 0, users=60, active=1000)]
    book = new_book()
    assert book.on_surges(wave) == []
    assert book.on_time(at(2 * 3600)) == []  # not even once unresolved for an hour: it is the customer's
    [event] = new_book().on_surges([*wave, start("diagnosis_class=server_error", 0, users=60, active=1000)])
    assert event.transition == "declared" and "wide impact" in event.reason
    lenient = msgspec.structs.replace(POLICY, declare=msgspec.structs.replace(POLICY.declare, advice_classes=[]))
    [declared] = IncidentBook(lenient, team_of).on_surges(wave)
    assert declared.transition == "declared"


# ---- grouping -----------------------------------------------------------------------------------

OUTAGE = {  # one payment outage as the detector sees it: in its service, class, every region and platform
    "service=payment": 100, "diagnosis_class=server_error": 100,
    "region=eu-west": 40, "region=us-east": 35, "region=cn-east": 25,
    "platform=ios": 50, "platform=android": 50,
}


def test_surges_of_one_bucket_form_one_incident_about_what_surges_alone():
    book = new_book()
    [declared] = book.on_surges([start(key, 0, users) for key, users in OUTAGE.items()])
    assert len(book.state.incidents) == 1
    assert declared.dimensions == {"service": "payment", "diagnosis_class": "server_error"}
    assert declared.root_key == "service=payment" and declared.affected_users == 100
    # a surge starting within the merge window joins it
    [joined] = book.on_surges([start("network=Comcast", 100, users=30)])
    assert joined.transition == "updated" and joined.reason == "surging too: network=Comcast"
    assert joined.incident_id == declared.incident_id and len(book.state.incidents) == 1


def test_a_lone_value_holding_few_of_the_users_is_not_what_failed():
    [declared] = new_book().on_surges([start("network=China Telecom", 0, users=300),
                                       start("region=cn-east", 0, users=300),
                                       start("app_version=5.2.0", 0, users=100)])
    assert declared.dimensions == {"region": "cn-east", "network": "China Telecom"}
    assert declared.root_key == "network=China Telecom"  # the policy's priority: network first


def test_the_root_is_the_first_lone_value_that_covers_the_incident_not_a_release_with_half_its_users():
    # a payment outage: the most used release surges alone too, with about half the users
    [declared] = new_book().on_surges([start("service=payment", 0, users=85),
                                       start("diagnosis_class=server_error", 0, users=85),
                                       start("app_version=5.2.0", 0, users=44)])
    assert declared.dimensions["app_version"] == "5.2.0"  # it surged alone, with half the users or more
    assert declared.root_key == "service=payment"  # but app_version comes first only if it covers 90 %


def test_a_service_surging_a_bucket_after_its_failure_class_becomes_the_root_and_the_id_stays():
    # each dimension value crosses its own threshold: the class can surge a bucket before the service
    book = new_book()
    [declared] = book.on_surges([start("diagnosis_class=server_error", 0, users=120)])
    assert declared.root_key == "diagnosis_class=server_error"
    [updated] = book.on_surges([start("service=payment", 10, users=118), update("diagnosis_class=server_error", 0, 20, 120)])
    assert updated.transition == "updated" and updated.incident_id == declared.incident_id
    assert updated.root_key == "service=payment" and "payment" in updated.title
    assert updated.reason == ("surging too: service=payment; "
                              "root cause now service=payment (was diagnosis_class=server_error)")
    # a surge that explains nothing better leaves the root alone
    [later] = book.on_surges([start("network=Comcast", 30, users=20)])
    assert (later.root_key, later.reason) == ("service=payment", "surging too: network=Comcast")


@pytest.mark.parametrize(("starts_s", "same_incident"), [(120, True), (130, False)])
def test_a_surge_joins_an_incident_when_it_starts_within_the_merge_window_of_its_latest_surge(starts_s, same_incident):
    """Related surges start together; one starting long into an outage is another incident,
    even while the first is still active (its updates do not stretch the window)."""
    book = new_book()
    first = book.on_surges([start(key, 0, users) for key, users in OUTAGE.items()])
    assert transitions(first) == ["declared"]
    for t in range(10, starts_s, 10):  # the outage goes on, bucket after bucket
        book.on_time(at(t))
        book.on_surges([update(key, 0, t, users) for key, users in OUTAGE.items()])
    [event] = book.on_surges([start("network=Comcast", starts_s, users=60)])
    if same_incident:  # 120 s after the latest surge of the group started
        assert (event.incident_id, event.transition) == (first[0].incident_id, "updated")
    else:
        assert event.incident_id != first[0].incident_id and event.transition == "declared"
        assert event.dimensions == {"network": "Comcast"}


# ---- the end ------------------------------------------------------------------------------------

def declared_then_ended(book: IncidentBook) -> list[IncidentEvent]:
    """A payment surge from bucket 0, ended at 100 s after quiet buckets since 40 s."""
    events = book.on_surges([start("service=payment", 0)])
    events += book.on_surges([update("service=payment", 0, 20)])
    return events + book.on_surges([end("service=payment", 0, 100)])


def test_an_incident_is_mitigated_when_its_surges_end_and_resolved_a_cooldown_after_the_first_quiet_bucket():
    book = new_book()
    events = declared_then_ended(book)
    assert transitions(events) == ["declared", "mitigated"]
    assert events[-1].at_us == at(100)
    quiet_since = 40
    assert book.on_time(at(quiet_since + POLICY.resolve.cooldown_s - 10)) == []  # one bucket before
    [resolved] = book.on_time(at(quiet_since + POLICY.resolve.cooldown_s))
    assert resolved.transition == "resolved" and resolved.resolved_at_us == resolved.at_us == at(160)
    assert resolved.reason.startswith("rates stayed at baseline for 120 s")
    assert book.open_incidents() == [] and book.state.incidents == []


def test_one_surge_ending_of_two_does_not_mitigate():
    book = new_book()
    book.on_surges([start("service=payment", 0), start("region=eu-west", 0)])
    assert book.on_surges([end("region=eu-west", 0, 100), update("service=payment", 0, 100)]) == []


def test_a_surge_coming_back_during_the_cooldown_reopens_the_incident():
    book = new_book()
    declared_then_ended(book)
    assert book.on_time(at(130)) == []
    [back] = book.on_surges([start("service=payment", 130)])
    assert back.transition == "updated"
    assert back.reason == "failures surge again before the cool-down ended: service=payment"
    assert book.on_time(at(160)) == [] and book.on_time(at(1000)) == []
    assert [i.state for i in book.open_incidents()] == ["declared"]


def test_an_incident_still_active_after_an_hour_is_escalated_once():
    book = new_book()
    [declared] = book.on_surges([start("service=payment", 0)])
    assert declared.severity == "sev3"
    assert book.on_time(at(3590)) == []
    [escalated] = book.on_time(at(3600))
    assert (escalated.transition, escalated.severity, escalated.sequence) == ("escalated", "sev2", 2)
    assert escalated.reason == "unresolved after 60 minutes"
    assert book.on_time(at(7200)) == []


def test_when_event_time_jumps_ahead_each_timed_decision_carries_the_time_its_rule_came_true():
    book = new_book()
    declared_then_ended(book)
    [resolved] = book.on_time(at(1000))  # a quiet stretch: the watermark moved 900 s in one step
    assert resolved.at_us == resolved.resolved_at_us == at(160)
    book = new_book()
    book.on_surges([start("service=payment", 0)])
    assert book.on_surges([start("service=edge-gateway", 200)]) == []  # a small SRE surge of its own
    escalated, declared = book.on_time(at(10_000))
    assert (escalated.transition, escalated.at_us) == ("escalated", at(3600))
    assert (declared.transition, declared.root_key, declared.at_us) == ("declared", "service=edge-gateway", at(3800))


# ---- a person's commands ------------------------------------------------------------------------

def test_a_person_declares_an_incident_that_surges_then_join_and_resolves_it():
    book = new_book()
    [declared] = book.on_command(IncidentCommand(
        action="declare", at_us=at(50), by="alice", title="Orders cannot be placed", reason="customers call",
        dimensions={"service": "orders"}, severity="sev1"))
    assert (declared.transition, declared.declared_by, declared.severity) == ("declared", "alice", "sev1")
    assert (declared.dimensions, declared.root_key) == ({"service": "orders"}, "service=orders")
    assert (declared.title, declared.reason, declared.teams) == ("Orders cannot be placed", "customers call", ["commerce"])

    [joined] = book.on_surges([start("service=orders", 1000)])  # long after: named by the person, it joins
    assert (joined.incident_id, joined.transition, joined.severity) == (declared.incident_id, "updated", "sev1")

    [resolved] = book.on_command(IncidentCommand(action="resolve", at_us=at(1100), by="bob",
                                                 incident_id=declared.incident_id, reason="rolled back"))
    assert (resolved.transition, resolved.resolved_at_us) == ("resolved", at(1100))
    assert resolved.reason == "resolved by bob: rolled back"
    assert book.on_command(IncidentCommand(action="resolve", at_us=at(1100), by="bob", incident_id="inc-nope")) == []


def test_a_resolved_incidents_surges_are_silenced_until_they_end():
    book = new_book()
    [declared] = book.on_surges([start("service=payment", 0)])
    book.on_command(IncidentCommand(action="resolve", at_us=at(30), by="bob", incident_id=declared.incident_id))
    for at_s in range(40, 200, 10):
        assert book.on_time(at(at_s)) == []
        assert book.on_surges([update("service=payment", 0, at_s)]) == []
    assert book.on_surges([end("service=payment", 0, 200)]) == []
    assert book.state.silenced == []
    [again] = book.on_surges([start("service=payment", 300)])  # a new surge is a new incident
    assert again.transition == "declared" and again.incident_id != declared.incident_id


# ---- identity -----------------------------------------------------------------------------------

def a_day_of_surges(book: IncidentBook) -> list[IncidentEvent]:
    """An outage with updates and a cool-down, a person's declaration that escalates, and a
    small SRE surge declared once unresolved for an hour."""
    events = book.on_surges([start(key, 0, users) for key, users in OUTAGE.items()])
    events += book.on_surges([start("network=Comcast", 20, users=30)])
    events += book.on_surges([update("service=payment", 0, 40, users=300)])
    events += book.on_surges([end(key, 0, 200, users) for key, users in OUTAGE.items()])
    events += book.on_surges([end("network=Comcast", 20, 200, users=30)])
    events += book.on_time(at(400))
    events += book.on_command(IncidentCommand(action="declare", at_us=at(500), by="alice",
                                              dimensions={"region": "eu-west"}))
    events += book.on_surges([start("service=edge-gateway", 600)])
    events += book.on_time(at(5000))
    return events


def test_sequences_count_one_two_three_per_incident():
    events = a_day_of_surges(new_book())
    by_incident: dict[str, list[int]] = {}
    for event in events:
        by_incident.setdefault(event.incident_id, []).append(event.sequence)
    assert list(by_incident.values()) == [[1, 2, 3, 4, 5], [1, 2], [1]]
    assert transitions(events) == ["declared", "updated", "updated", "mitigated", "resolved",
                                   "declared", "escalated", "declared"]


def test_the_same_input_gives_the_same_incident_events_so_a_restarted_worker_repeats_itself():
    assert a_day_of_surges(new_book()) == a_day_of_surges(new_book())


def test_a_book_saved_and_loaded_mid_incident_continues_identically():
    book = new_book()
    book.on_surges([start("service=payment", 0)])
    restored = IncidentBook(POLICY, team_of, load_book(dump_book(book.state)))
    ended = [end("service=payment", 0, 100)]
    assert transitions(book.on_surges(ended)) == transitions(restored.on_surges(ended)) == ["mitigated"]
    [resolved] = book.on_time(at(200))
    assert restored.on_time(at(200)) == [resolved]


# ---- the engine ---------------------------------------------------------------------------------

CONFIG = EngineConfig(SurgeParams(warmup_buckets=6))


def users(*names: str) -> list[int]:
    sketch = DistinctSketch()
    for name in names:
        sketch.add(name)
    return sketch.hashes


def count(key: str, bucket_s: int, failed: int, source: str = "w1", affected: int = 0) -> SignalCount:
    dimension, value = key.split("=", 1)
    return SignalCount(source=source, dimension=dimension, value=value, bucket_start_us=at(bucket_s),  # type: ignore[arg-type]
                       failed=failed, users=users(*(f"u{i}" for i in range(affected))))


def clock(source: str, at_s: int) -> SignalClock:
    return SignalClock(source=source, watermark_us=at(at_s))


def new_engine() -> SurgeEngine:
    return SurgeEngine(CONFIG, POLICY, team_of)


def test_the_watermark_is_the_slowest_live_source_and_an_idle_one_stops_holding_it_back():
    engine = new_engine()
    engine.on_clock(clock("slow", 50), wall_s=0)
    engine.on_clock(clock("fast", 100), wall_s=0)
    assert engine.watermark(wall_s=0) == at(50) and engine.state.real.closed_until_us == at(50)
    engine.on_clock(clock("fast", 120), wall_s=30)  # "slow" last spoke 30 s ago: still live
    assert engine.state.real.closed_until_us == at(50)
    engine.on_clock(clock("fast", 120), wall_s=30.5)  # now idle
    assert engine.watermark(wall_s=30.5) == at(120) and engine.state.real.closed_until_us == at(120)
    engine.on_clock(clock("slow", 60), wall_s=31)  # back: it holds the watermark again
    assert engine.watermark(wall_s=31) == at(60)


def test_a_late_partial_counts_in_the_oldest_open_bucket():
    engine = new_engine()
    engine.on_clock(clock("w1", 0), wall_s=0)
    assert engine.on_clock(clock("w1", 100), wall_s=1).surges == []  # buckets before 100 s are closed
    engine.on_count(count("service=payment", 100, failed=5))
    engine.on_count(count("service=payment", 50, failed=30))  # a lagging worker's count of a closed bucket
    [started] = engine.on_clock(clock("w1", 110), wall_s=2).surges
    assert (started.phase, started.started_at_us, started.at_us) == ("start", at(100), at(110))
    assert started.failed_requests == 35


def run(engine: SurgeEngine, buckets: range) -> Outputs:
    """A payment outage in buckets 20–29 (60 users each bucket) over one failure per bucket."""
    out = Outputs()
    for b in buckets:
        bucket_s = 10 * b
        surging = 20 <= b < 30
        engine.on_count(count("service=payment", bucket_s, failed=60 if surging else 1, affected=60 if surging else 1))
        engine.on_count(count("region=eu-west", bucket_s, failed=40 if surging else 2, affected=40 if surging else 2))
        out.extend(engine.on_clock(clock("w1", bucket_s + 10), wall_s=bucket_s + 10))
    return out


def test_an_engine_saved_and_loaded_mid_surge_continues_like_one_never_stopped():
    uninterrupted = run(new_engine(), range(0, 60))
    assert [e.transition for e in uninterrupted.incidents] == ["declared", "mitigated", "resolved"]
    assert {(e.dimension, e.phase) for e in uninterrupted.surges} >= {("service", "start"), ("service", "end")}

    before = new_engine()
    first = run(before, range(0, 25))
    assert [e.transition for e in first.incidents] == ["declared"]  # cut in the middle of the surge
    restored = SurgeEngine(CONFIG, POLICY, team_of, load_engine(dump_engine(before.state)))
    second = run(restored, range(25, 60))
    assert first.surges + second.surges == uninterrupted.surges
    assert first.incidents + second.incidents == uninterrupted.incidents


# ---- the policy file ----------------------------------------------------------------------------

def broken(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_POLICY_PATH.read_text()
    assert old in text
    path = tmp_path / "policy.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(("old", "new", "words"), [
    ("window_s = 120", "window_s = ", "invalid"),  # not TOML
    ('priority = ["network"', 'priority = ["colour", "network"', "unknown dimensions in root.priority: colour"),
    ("cooldown_s = 120", "", "cooldown_s"),
    ("sev1_users = 2000", 'sev1_users = "many"', "sev1_users"),
    ("cover_share = 0.9", "cover_share = 90", "root.cover_share is 90"),
])
def test_a_broken_policy_file_is_a_user_error_that_names_the_mistake(tmp_path, old, new, words):
    path = broken(tmp_path, old, new)
    with pytest.raises(UserError) as caught:
        load_policy(path)
    assert str(path) in caught.value.message and words in caught.value.message
    assert caught.value.hint


def test_a_missing_policy_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        load_policy(Path("/nonexistent/policy.toml"))


def test_a_drill_keeps_its_own_time_and_its_own_incidents():
    """A replay far ahead in event time neither closes real buckets nor joins a real incident."""
    engine = new_engine()
    for t in range(0, 80, 10):  # real traffic, quiet, up to 80 s
        engine.on_count(count("service=payment", t, 1))
        engine.on_clock(clock("w1", t + 10), wall_s=0)
    real_closed = engine.state.real.closed_until_us
    drill_counts = [msgspec.structs.replace(count("service=payment", t, 1 if t < 3000 else 60, affected=60), drill=True)
                    for t in range(2000, 3100, 10)]
    out = Outputs()
    for signal in drill_counts:
        engine.on_count(signal)
        out.extend(engine.on_clock(SignalClock(source="w1", watermark_us=signal.bucket_start_us + 10 * US, drill=True),
                                   wall_s=0))
    assert engine.state.real.closed_until_us == real_closed, "the drill moved real time"
    assert engine.state.drill.closed_until_us == at(3100)
    declared = [e for e in out.incidents if e.transition == "declared"]
    assert len(declared) == 1 and declared[0].drill and all(s.drill for s in out.surges)
    assert "drill:service=payment" in engine.state.keys and not engine.state.keys["service=payment"].drill
    # real traffic goes on at its own time, and a real surge is a real incident of its own
    more = Outputs()
    for t in range(80, 120, 10):
        engine.on_count(count("service=payment", t, 60, affected=60))
        more.extend(engine.on_clock(clock("w1", t + 10), wall_s=0))
    [real] = [e for e in more.incidents if e.transition == "declared"]
    assert not real.drill and real.incident_id != declared[0].incident_id


def test_the_stored_state_is_one_compressed_record_per_changed_value_and_restores_exactly():
    """A single record grew past Kafka's 1 MB limit while a worker caught up on a backlog."""
    from streams.detect import pack_core, pack_key, slim, unpack_state

    engine = new_engine()
    engine.on_count(count("service=payment", 0, 5, affected=200))
    engine.on_count(count("region=eu-west", 0, 1))
    assert engine.take_dirty() == {"service=payment", "region=eu-west"}
    engine.on_clock(clock("w1", 10), wall_s=0)
    assert engine.take_dirty() == {"service=payment", "region=eu-west"}  # both closed a bucket
    engine.on_count(count("service=payment", 10, 5))
    assert engine.take_dirty() == {"service=payment"} and engine.take_dirty() == set()
    stored = {key: pack_key(entry) for key, entry in engine.state.keys.items()}
    assert unpack_state(pack_core(engine.state), stored) == engine.state
    payment = engine.state.keys["service=payment"]
    assert sum(len(b.users) for b in slim(payment).open.values()) == 0
    assert [b.failed for b in slim(payment).open.values()] == [b.failed for b in payment.open.values()]


def test_a_late_surge_whose_users_are_an_incidents_users_joins_it_an_unrelated_one_does_not():
    """An ISP outage hits the few users of one app version too; that version surges minutes later."""
    from streams.detect import contained

    engine = new_engine()
    out = Outputs()
    isp_users = [f"u{i}" for i in range(400)]
    for t in range(0, 300, 10):
        failing = 60 if t >= 100 else 1  # the ISP fails from 100 s on
        engine.on_count(SignalCount(source="w1", dimension="network", value="China Telecom", bucket_start_us=at(t),
                                    failed=failing, users=users(*isp_users[:failing + t])))
        if t == 200:  # the release's users: all behind that ISP
            engine.on_count(SignalCount(source="w1", dimension="app_version", value="5.4.0", bucket_start_us=at(t),
                                        failed=40, users=users(*isp_users[:40])))
        if t == 250:  # somebody else's problem: users nobody saw before
            engine.on_count(SignalCount(source="w1", dimension="service", value="payment", bucket_start_us=at(t),
                                        failed=60, users=users(*(f"p{i}" for i in range(60)))))
        out.extend(engine.on_clock(clock("w1", t + 10), wall_s=0))
    declared = [e for e in out.incidents if e.transition == "declared"]
    assert [e.root_key for e in declared] == ["network=China Telecom", "service=payment"]
    joined = [e for e in out.incidents if e.transition == "updated" and "app_version=5.4.0" in e.reason]
    assert joined and joined[0].incident_id == declared[0].incident_id
    assert contained([1, 2, 3, 4], [1, 2, 3, 4, 5], k=256) == 1.0
    assert contained([1, 2, 10, 11], [1, 2, 3, 4], k=4) == 1.0  # 10, 11 lie beyond a full sketch: not compared
    assert contained([7, 8], [1, 2], k=256) == 0.0 and contained([], [1], k=256) is None
