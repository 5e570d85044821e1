"""The traffic generator, without Kafka: shapes, determinism, scenarios and ground truth."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timezone

import msgspec
import pytest

from supportlens.contracts import FaultReport, Span, encode
from supportlens.errors import UserError
from supportlens.simulator.generate import SECOND_US, Plan, Simulation, seasonal_factor
from supportlens.simulator.labels import ReportLabel, RequestLabel
from supportlens.simulator.run import SimulateOptions, plan_for
from supportlens.simulator.scenarios import SCENARIOS, scenario
from supportlens.simulator.world import BAD_RELEASE, SERVICES, build_world

NOON_UTC = int(datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc).timestamp() * SECOND_US)  # 16:00 in Asia


def run(name: str, rate: float = 300, duration: int = 60, seed: int = 3, start_us: int = NOON_UTC, users: int = 2000):
    sim = Simulation(Plan(scenario(name), rate, duration, seed, start_us), build_world(seed, users))
    events, labels = [], []
    for tick in sim.ticks():
        events.extend(tick.events)
        labels.extend(tick.labels)
    return sim, events, labels


def test_the_same_seed_gives_the_same_run_and_another_seed_does_not():
    _, a, _ = run("normal", duration=10)
    _, b, _ = run("normal", duration=10)
    _, c, _ = run("normal", duration=10, seed=4)
    assert [encode(e.record) for e in a] == [encode(e.record) for e in b]
    assert [encode(e.record) for e in a] != [encode(e.record) for e in c]


def test_every_request_is_one_client_span_and_a_call_chain_sharing_its_request_id():
    sim, events, labels = run("normal", duration=20)
    spans: dict[str, list[Span]] = defaultdict(list)
    for e in events:
        if isinstance(e.record, Span):
            assert e.key == e.record.request_id  # keyed for co-partitioning
            spans[e.record.request_id].append(e.record)
    requests = [label for label in labels if isinstance(label, RequestLabel)]
    assert len(requests) == sim.summary().requests
    for label in requests:
        got = spans.get(label.request_id, [])
        clients = [s for s in got if s.side == "client"]
        servers = [s for s in got if s.side == "server"]
        assert len(clients) == int(label.client_span_emitted)
        assert len(servers) == label.server_spans
        if servers:
            assert len({s.trace_id for s in got}) == 1
            root = [s for s in servers if s.service == "edge-gateway"]
            assert len(root) == 1
            # every child starts inside its parent and ends before it
            by_id = {s.span_id: s for s in servers}
            for s in servers:
                parent = by_id.get(s.parent_span_id)
                if parent is not None:
                    assert parent.start_us <= s.start_us
                    assert s.start_us + s.duration_us <= parent.start_us + parent.duration_us + 1
    teams = {SERVICES[s.service].team for ss in spans.values() for s in ss if s.side == "server"}
    assert len(teams) >= 4  # chains cross services owned by different teams


def test_traffic_follows_the_time_of_day():
    assert seasonal_factor(4, 0) == pytest.approx(0.1)
    assert seasonal_factor(16, 0) == pytest.approx(1.0)
    night = plan_for(SimulateOptions("quiet-night", 300, 60, start=None))
    assert datetime.fromtimestamp(night.start_us / SECOND_US, timezone.utc).hour == 20
    busy, _, _ = run("normal", duration=30)
    quiet, _, _ = run("quiet-night", duration=30, start_us=night.start_us)
    assert quiet.summary().requests < 0.6 * busy.summary().requests


@pytest.mark.parametrize(
    ("name", "cls", "exposed"),
    [
        ("service-outage", "server_error", lambda label, user: label.failing_service == "payment"),
        ("isp-outage", "network_unreachable", lambda label, user: user.region.name == "cn-east" and user.isp.name == "China Telecom"),
        ("bad-release", "client_crash", lambda label, user: user.app_version == BAD_RELEASE),
        ("misuse-wave", "client_misuse", None),
    ],
)
def test_a_scenario_hits_its_targets_only_inside_its_window(name, cls, exposed):
    sim, events, labels = run(name)
    world = sim.world
    users = {u.user_id: u for u in world.users}
    requests = [label for label in labels if isinstance(label, RequestLabel)]
    inside = [r for r in requests if r.in_scenario_window and r.expected_class == cls]
    outside = [r for r in requests if not r.in_scenario_window and r.expected_class == cls]
    # the fault dominates its window; outside it only background noise remains
    assert len(inside) > 10 * max(1, len(outside))
    if exposed is not None:
        hit = [r for r in inside if exposed(r, users[r.user_id])]
        assert len(hit) / len(inside) > 0.9
    else:
        assert {users[r.user_id].account_id for r in inside} >= {world.misuse_account}
    summary = sim.summary()
    assert summary.classes[cls] == sum(1 for r in requests if r.expected_class == cls)
    if SCENARIOS[name].expects_incident:
        (window,) = summary.expected_incidents
        assert window.expected_class == cls and window.dimension == SCENARIOS[name].dimension
        assert summary.start_us < window.start_us < window.end_us < summary.end_us


def test_reports_carry_ip_request_ids_and_the_recent_client_log():
    sim, events, labels = run("service-outage")
    reports = [e.record for e in events if isinstance(e.record, FaultReport)]
    report_labels = {label.report_id: label for label in labels if isinstance(label, ReportLabel)}
    assert len(reports) == sim.summary().counts["fault-reports"] == len(report_labels) > 20
    users = {u.user_id: u for u in sim.world.users}
    requests = {label.request_id: label for label in labels if isinstance(label, RequestLabel)}
    # a sequence-misuse report's request looks like a server error alone; its truth is the misuse before it
    # (this run is too short for an episode to end inside it: none may be there)
    traced = {e.report_id for e in sim.summary().sequence_misuse.episodes}
    for report in reports:
        assert report.client_ip == users[report.user_id].client_ip
        assert report.locale == users[report.user_id].locale
        failed = requests[report.request_ids[0]]
        assert failed.user_id == report.user_id
        expected = "client_misuse" if report.report_id in traced else failed.expected_class
        assert report_labels[report.report_id].expected_class == expected
        assert 1 <= len(report.client_log) <= 10
        assert report.client_log[-1].request_id == report.request_ids[0]
        assert report.received_at_us > failed.start_us
    by_class = Counter(label.expected_class for label in report_labels.values())
    assert by_class.most_common(1)[0][0] == "server_error"


def test_ground_truth_never_leaks_into_the_events():
    _, events, _ = run("bad-release", duration=20)
    for e in events:
        raw = msgspec.json.decode(encode(e.record))
        text = msgspec.json.encode(raw).decode()
        assert "expected_class" not in text and "bad-release" not in text and "scenario" not in text


def test_accounts_have_a_vip_share_and_the_misuse_account_is_vip():
    world = build_world(1, 2000)
    vip = [a for a in world.accounts if a.tier == "vip"]
    assert len(vip) == round(len(world.accounts) * 0.1)
    assert world.misuse_account in world.vip_accounts
    assert all(a.contacts for a in vip)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SimulateOptions("outage", 10, 10), "unknown scenario 'outage'; known: normal, service-outage"),
        (SimulateOptions("normal", 0, 10), "--rate must be above 0"),
        (SimulateOptions("normal", 10, 0), "--duration must be at least 1 second"),
        (SimulateOptions("normal", 10, 10, users=5), "--users must be at least 20"),
        (SimulateOptions("normal", 10, 10, speed=-1), "--speed must be 0"),
    ],
)
def test_bad_simulator_options_are_user_errors(options, message):
    with pytest.raises(UserError) as caught:
        plan_for(options)
    assert message in caught.value.message


def test_behaviour_paths_walk_the_funnels_and_leave_the_traffic_as_it_was(monkeypatch):
    from supportlens.contracts import BehaviourEvent
    from supportlens.simulator.behaviour import FUNNEL_PATHS, STUCK, WITHDRAWN, BehaviourPaths

    sim, events, _ = run("bad-release", duration=300, rate=200)
    truth = sim.summary().behaviour
    users = {u.user_id: u for u in sim.world.users}
    behaviour = [e.record for e in events if isinstance(e.record, BehaviourEvent)]
    withdrawn = {w.user_id: w.at_us for w in truth.withdrawn}
    assert withdrawn and truth.sessions > 100 and sim.summary().counts["behaviour"] == len(behaviour)
    assert (truth.stuck.funnel, truth.stuck.step, truth.stuck.app_version, truth.stuck.platform) == (
        STUCK.funnel, STUCK.step, STUCK.app_version, STUCK.platform)
    assert truth.stuck.drop_step == STUCK.step != next(f.drop_step for f in truth.funnels if f.funnel == STUCK.funnel)
    steps = {action: path.name for path in FUNNEL_PATHS for action, _ in path.steps}
    sessions: dict[str, list[str]] = defaultdict(list)
    for event in behaviour:
        assert users[event.user_id].consented  # never a user without consent
        assert event.user_id not in withdrawn or event.ts_us <= withdrawn[event.user_id]
        assert event.ts_us < sim.summary().end_us
        if event.name in steps:
            sessions[event.attributes["session_id"]].append(event.name)
    assert sum(1 for e in behaviour if e.name == WITHDRAWN) == len(withdrawn)
    for walked in sessions.values():  # each session walks one funnel from its first step, in order
        path = next(p for p in FUNNEL_PATHS if p.name == steps[walked[0]])
        assert walked == [action for action, _ in path.steps][:len(walked)]
    # the traffic does not depend on the behaviour paths: without any session it is the same, byte for byte
    monkeypatch.setattr(BehaviourPaths, "start_sessions", lambda self, t0, rates: None)
    _, without, _ = run("bad-release", duration=300, rate=200)
    assert [encode(e.record) for e in events if not isinstance(e.record, BehaviourEvent)] == [
        encode(e.record) for e in without if not isinstance(e.record, BehaviourEvent)]
