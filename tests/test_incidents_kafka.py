"""Surges and incidents on real Kafka with real worker processes: scripted outages are declared
early with the right dimension and a policy reason, resolve after the cool-down and announce it,
a quiet run declares nothing, a person can declare and resolve, and a worker killed with SIGKILL
during an open incident does not declare it a second time."""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from helpers import WorkerProcess, replay_start, settings_env, supportlens_cmd
from supportlens.config import Settings, load_settings
from supportlens.contracts import IncidentEvent, SurgeEvent, decode
from supportlens.simulator.labels import RunLabel
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topic_reader import read_range
from supportlens.topics import provision
from streams.incidents import load_policy

pytestmark = pytest.mark.kafka
COOLDOWN_S = load_policy().resolve.cooldown_s  # the bundled policy, as shipped
DECLARE_WITHIN_S = 30
LATE_COUNTS_S = 60


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "SUPPORTLENS_CORRELATION_GRACE_S": "2",
        "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5",
        "SUPPORTLENS_SURGE_WARMUP_S": "60",  # the runs below are five minutes of traffic
        "SUPPORTLENS_WORKER_SESSION_TIMEOUT_S": "8",  # a killed worker's partitions move on in 8 s, not 60
    }


def _settings(kafka) -> Settings:
    return load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"i{uuid.uuid4().hex[:8]}.", partitions=3)


def _incidents(settings: Settings) -> list[IncidentEvent]:
    return [decode(m.value(), IncidentEvent) for m in read_range(settings, [settings.topic("incidents")])]


def _wait(settings: Settings, worker: WorkerProcess, done, timeout: float = 150) -> list[IncidentEvent]:
    deadline = time.monotonic() + timeout
    while True:
        events = _incidents(settings)
        if done(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"incidents so far: {[(e.transition, e.root_key) for e in events]}\n{worker.tail()}")
        time.sleep(1.0)


# The runs end this long before now: once their records are read, the worker's clock moves on
# with the wall clock (streams/signals.py), so the surge's quiet buckets and the cool-down are
# already behind it and the end is announced at once — stamped with the event time its rule
# came true, as a live worker would — instead of after two more minutes of waiting.
ENDED_AGO_S = 180


def _run(settings: Settings, tmp_path: Path, scenario: str, speed: float = 0, duration: int = 300) -> RunLabel:
    start = (replay_start(duration, ENDED_AGO_S) if not speed
             else datetime.now(timezone.utc) - timedelta(seconds=duration / speed + ENDED_AGO_S))
    return simulate(settings, SimulateOptions(scenario, rate=50, duration_s=duration, seed=11, users=3000, speed=speed,
                                              start=start, labels_path=tmp_path / f"{scenario}.jsonl"))


@pytest.mark.parametrize("scenario", ["service-outage", "isp-outage"])
def test_outage_is_declared_early_resolved_after_cooldown_and_announced(kafka, tmp_path, scenario):
    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **_env(tmp_path)).wait_ready()
    try:
        run = _run(settings, tmp_path, scenario)
        events = _wait(settings, worker, lambda es: any(e.transition == "resolved" for e in es))
    finally:
        worker.stop()
    window = run.expected_incidents[0]
    declared = [e for e in events if e.transition == "declared"]
    assert len(declared) == 1, [(e.incident_id, e.root_key, e.reason) for e in declared]
    incident = declared[0]
    assert window.dimension.items() <= incident.dimensions.items(), incident.dimensions
    assert incident.reason and incident.declared_by == "policy"
    assert incident.suspects == []  # no change was posted: none is named
    assert 0 <= incident.at_us - window.start_us <= DECLARE_WITHIN_S * 1_000_000, \
        f"declared {(incident.at_us - window.start_us) / 1e6:.0f} s after the onset"
    resolved = next(e for e in events if e.transition == "resolved")
    assert resolved.incident_id == incident.incident_id and "over" in resolved.reason
    # The cool-down plus slack, plus a minute: a worker that lags (a loaded CI machine) counts a
    # failure whose bucket has closed in the oldest open one (late, never lost, streams.detect),
    # which can keep the surge up to a minute past the outage.
    resolve_within_us = (LATE_COUNTS_S + COOLDOWN_S + 30) * 1_000_000
    assert resolved.at_us - window.end_us <= resolve_within_us, \
        f"resolved {(resolved.at_us - window.end_us) / 1e6:.0f} s after the outage ended"
    sequences = [e.sequence for e in events if e.incident_id == incident.incident_id]
    assert sequences == list(range(1, len(sequences) + 1))
    surges = [decode(m.value(), SurgeEvent) for m in read_range(settings, [settings.topic("surges")])]
    assert any(s.phase == "start" and f"{s.dimension}={s.value}" == incident.root_key for s in surges)


def test_quiet_night_declares_nothing_and_a_person_declares_and_resolves(kafka, tmp_path):
    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **_env(tmp_path)).wait_ready()
    env = {**settings_env(settings), **_env(tmp_path)}
    try:
        _run(settings, tmp_path, "quiet-night")
        declared = subprocess.run(
            supportlens_cmd("declare", "--title", "Checkout slow for some users", "--service", "payment",
                            "--by", "ann", "--reason", "support sees a wave of tickets"),
            env=env, capture_output=True, text=True, timeout=60)
        assert declared.returncode == 0, declared.stdout + declared.stderr
        events = _wait(settings, worker, lambda es: any(e.declared_by == "ann" for e in es))
        assert [e.declared_by for e in events if e.transition == "declared"] == ["ann"], "the quiet night declared one"
        manual = events[0]
        assert manual.dimensions == {"service": "payment"} and manual.title == "Checkout slow for some users"
        resolved = subprocess.run(supportlens_cmd("resolve", manual.incident_id, "--by", "ann"),
                                  env=env, capture_output=True, text=True, timeout=60)
        assert resolved.returncode == 0, resolved.stdout + resolved.stderr
        events = _wait(settings, worker, lambda es: any(e.transition == "resolved" for e in es))
        assert [e.transition for e in events] == ["declared", "resolved"]
        assert "ann" in events[-1].reason
        unknown = subprocess.run(supportlens_cmd("resolve", "inc-nosuchthing", "--by", "ann"),
                                 env=env, capture_output=True, text=True, timeout=60)
        assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    finally:
        worker.stop()


@pytest.mark.chaos
def test_a_worker_killed_during_an_open_incident_does_not_declare_it_again(kafka, tmp_path):
    settings = _settings(kafka)
    provision(settings)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log, **_env(tmp_path)).wait_ready()
    # paced, so the incident is open for a while in wall time: onset after ~6 s, end after ~21 s;
    # in the past, so event time never runs ahead of the clock
    simulation = subprocess.Popen(
        supportlens_cmd("simulate", "--scenario", "service-outage", "--rate", "50", "--duration", "300",
                        "--seed", "11", "--users", "3000", "--speed", "10",
                        "--start", (datetime.now(timezone.utc) - timedelta(seconds=300 + ENDED_AGO_S))
                        .strftime("%Y-%m-%dT%H:%M:%S"),
                        "--labels", str(tmp_path / "labels.jsonl")),
        env=settings_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(settings, worker, lambda es: any(e.transition == "declared" for e in es), timeout=90)
        worker.kill()
        time.sleep(2)
        worker = WorkerProcess(settings, log, **_env(tmp_path)).wait_ready()
        assert simulation.wait(120) == 0, simulation.stderr.read() if simulation.stderr else ""
        events = _wait(settings, worker, lambda es: any(e.transition == "resolved" for e in es), timeout=180)
    finally:
        simulation.kill()
        worker.stop()
    assert len({e.incident_id for e in events}) == 1, [(e.incident_id, e.transition) for e in events]
    by_sequence: dict[int, set[bytes]] = {}
    for event in events:
        by_sequence.setdefault(event.sequence, set()).add(event.transition.encode() + event.reason.encode())
    assert all(len(contents) == 1 for contents in by_sequence.values()), "a repeated transition differs"
    assert [e.transition for e in events].count("declared") >= 1
    assert {e.sequence for e in events if e.transition == "declared"} == {1}


def test_a_bad_deploy_is_caught_by_the_canary_before_it_reaches_everyone_and_named_the_top_suspect(kafka, tmp_path):
    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **_env(tmp_path)).wait_ready()
    start = datetime.now(timezone.utc) - timedelta(seconds=300)
    # 150 req/s: at 50, the 10 % step's payment failures rarely fill a 10-s bucket enough for
    # a surge of their own (the canary does not need that many: it compares both versions)
    run = simulate(settings, SimulateOptions("bad-deploy", rate=150, duration_s=300, seed=11, users=3000, speed=0,
                                             start=start, labels_path=tmp_path / "bad-deploy.jsonl"))
    window, rollout = run.expected_incidents[0], run.rollout
    assert rollout is not None and window.expected_suspect == rollout.change_id
    distractor = next(c.change_id for c in run.changes if not c.cause)

    def canaries() -> list[SurgeEvent]:
        return [s for s in (decode(m.value(), SurgeEvent) for m in read_range(settings, [settings.topic("surges")]))
                if s.kind == "canary"]

    def named(events: list[IncidentEvent]) -> bool:
        return any(e.suspects for e in events if e.declared_by == "policy") and bool(canaries())

    try:
        events = _wait(settings, worker, named)
    finally:
        worker.stop()
    declared = [e for e in events if e.transition == "declared"]
    assert len(declared) == 1, [(e.incident_id, e.root_key, e.reason) for e in declared]
    assert window.dimension.items() <= declared[0].dimensions.items()
    latest = max((e for e in events if e.suspects), key=lambda e: e.sequence)
    ranked = [s.change_id for s in latest.suspects]
    assert ranked[0] == rollout.change_id, latest.suspects
    assert distractor not in ranked[:1]  # below the deploy, or (it touches nothing failing) absent
    assert "payment 1.4.2 deployed" in latest.suspects[0].reason and "failing hop" in latest.suspects[0].reason
    first = min((c for c in canaries() if c.phase == "start"), key=lambda c: c.at_us)
    full_at = next(step.at_us for step in rollout.steps if step.share >= 1.0)
    assert (first.dimension, first.value, first.attributes["version"], first.attributes["baseline_version"]) == \
        ("service", "payment", rollout.to_version, rollout.from_version)
    assert first.at_us < full_at, "the canary fired only once the new version served everyone"
    assert float(first.attributes["failure_share"]) > 10 * float(first.attributes["baseline_failure_share"])
