"""The bad-deploy scenario without Kafka: a payment version rolls out 10 % → 50 % → 100 %, the
requests it serves fail, its deploy and an unrelated earlier config change are posted as
changes, and the labels say which change is to blame and when each step began."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timezone
from functools import cache

import msgspec
import pytest

from supportlens.contracts import Change, Span, decode, encode
from supportlens.simulator.generate import SECOND_US, Plan, Simulation
from supportlens.simulator.labels import RequestLabel, RunLabel, encode_label, read_labels, read_run
from supportlens.simulator.scenarios import PAYMENT_NEW, PAYMENT_OLD, SCENARIOS, scenario
from supportlens.simulator.world import build_world

START_US = int(datetime(2026, 11, 22, 4, tzinfo=timezone.utc).timestamp()) * SECOND_US  # midday in Asia
DURATION_S = 300
SEED = 11
STEPS_S = (90, 165, 240)  # 10 %, 50 %, 100 % of a 300-s run


@cache
def bad_deploy(rate: float = 100, seed: int = SEED):
    sim = Simulation(Plan(scenario("bad-deploy"), rate, DURATION_S, seed, START_US), build_world(seed, 3000))
    ticks = list(sim.ticks())
    return sim, ticks


def _events(ticks):
    return [e for tick in ticks for e in tick.events]


def _payment_spans(ticks) -> list[Span]:
    return [e.record for e in _events(ticks)
            if isinstance(e.record, Span) and e.record.side == "server" and e.record.service == "payment"]


def _step_of(ts_us: int) -> int:
    """0 before the deploy, then 1, 2, 3 for the 10 %, 50 % and 100 % steps."""
    return sum(ts_us >= START_US + s * SECOND_US for s in STEPS_S)


def test_the_new_version_serves_the_scheduled_share_of_payment_requests_at_each_step():
    _, ticks = bad_deploy()
    spans = _payment_spans(ticks)
    assert all(s.attributes.get("service.version") in (PAYMENT_OLD, PAYMENT_NEW) for s in spans)
    # a request picks its version when it starts (its client span's time); its payment hop starts a little later
    requests = {label.request_id: label for tick in ticks for label in tick.labels if isinstance(label, RequestLabel)}
    by_step: dict[int, Counter[str]] = {step: Counter() for step in range(4)}
    for span in spans:
        by_step[_step_of(requests[span.request_id].start_us)][span.attributes["service.version"]] += 1
    for step, share in enumerate((0.0, 0.1, 0.5, 1.0)):
        versions = by_step[step]
        n = sum(versions.values())
        assert n > 400, (step, versions)
        got = versions[PAYMENT_NEW] / n
        if share in (0.0, 1.0):
            assert got == share, (step, versions)
        else:
            assert abs(got - share) < 4 * math.sqrt(share * (1 - share) / n), (step, got, share, n)
    # only the rolled-out service's spans say which version served them
    others = [e.record for e in _events(ticks) if isinstance(e.record, Span) and e.record.service != "payment"]
    assert others and not any("service.version" in s.attributes for s in others)


def test_failures_come_from_the_new_version_only():
    sim, ticks = bad_deploy()
    spans = _payment_spans(ticks)
    by_version: dict[str, Counter[int | None]] = {PAYMENT_OLD: Counter(), PAYMENT_NEW: Counter()}
    for span in spans:
        by_version[span.attributes["service.version"]][span.http_status] += 1
    new, old = by_version[PAYMENT_NEW], by_version[PAYMENT_OLD]
    new_failed = new[503] / sum(new.values())
    old_failed = old[503] / sum(old.values())
    assert new_failed == pytest.approx(sim.plan.scenario.probability, abs=0.03)
    assert old_failed < 0.01  # background noise only
    assert all(s.status == "error" for s in spans if s.http_status == 503)
    # the ground truth agrees: the scenario's failures are server errors on the payment hop, from the 10 % step on
    requests = [label for tick in ticks for label in tick.labels if isinstance(label, RequestLabel)]
    # one account's sequence-misuse episodes fail at payment too, in every scenario and on either version
    # (AMOUNT_MISMATCH, the misuse's, not the deploy's), some after the run's end: not the scenario's failures
    misuse = {e.failure_request_id for e in sim.summary().sequence_misuse.episodes}
    failed = [r for r in requests if r.expected_class == "server_error" and r.failing_service == "payment"
              and r.request_id not in misuse]
    before = [r for r in failed if r.start_us < START_US + STEPS_S[0] * SECOND_US]
    assert len(failed) > 20 * max(1, len(before))
    assert all(r.in_scenario_window for r in failed if r not in before)


def test_the_deploy_and_the_earlier_config_change_are_posted_on_the_changes_topic():
    sim, ticks = bad_deploy()
    posts = [(tick.second, e) for tick in ticks for e in tick.events if e.topic == "changes"]
    run_tag = START_US // SECOND_US
    deploy_id, config_id = f"deploy-payment-{PAYMENT_NEW}-{run_tag}", f"config-search-ranking-{run_tag}"
    assert [(second, e.key) for second, e in posts] == [(0, config_id), (STEPS_S[0], deploy_id), (STEPS_S[2], deploy_id)]
    for _, e in posts:
        assert isinstance(e.record, Change) and e.key == e.record.change_id
        assert e.ts_us == e.record.started_at_us  # the record's time is its change's start
        assert decode(encode(e.record), Change) == e.record  # valid against the contract
    (_, config), (_, started), (_, finished) = [(s, e.record) for s, e in posts]
    deployed_at = START_US + STEPS_S[0] * SECOND_US
    assert (config.kind, config.service, config.started_at_us) == ("config", "search", deployed_at - 20 * 60 * SECOND_US)
    assert config.finished_at_us is not None and config.finished_at_us < START_US
    assert (started.kind, started.service, started.version, started.from_version) == ("deploy", "payment", "1.4.2", "1.4.1")
    assert started.started_at_us == deployed_at and started.finished_at_us is None  # posted when it starts ...
    # ... and again, same id, when it reaches everyone
    assert finished == msgspec.structs.replace(started, finished_at_us=START_US + STEPS_S[2] * SECOND_US)
    assert sim.summary().counts["changes"] == len(posts) == 3


def test_the_labels_carry_the_schedule_the_blamed_change_and_the_incident_window(tmp_path):
    sim, ticks = bad_deploy()
    path = tmp_path / "labels.jsonl"
    with path.open("wb") as handle:
        for tick in ticks:
            handle.write(b"".join(encode_label(label) for label in tick.labels))
        handle.write(encode_label(sim.summary()))
    run = read_run(path)
    assert isinstance(list(read_labels(path))[-1], RunLabel)
    at = [START_US + s * SECOND_US for s in STEPS_S]
    run_tag = START_US // SECOND_US
    assert run.rollout is not None
    assert (run.rollout.service, run.rollout.from_version, run.rollout.to_version) == ("payment", "1.4.1", "1.4.2")
    assert [(s.at_us, s.share) for s in run.rollout.steps] == list(zip(at, (0.1, 0.5, 1.0)))
    assert run.rollout.change_id == f"deploy-payment-1.4.2-{run_tag}"
    assert run.rollout.expected_class == "server_error"
    (window,) = run.expected_incidents
    assert (window.expected_class, window.dimension) == ("server_error", {"service": "payment"})
    assert (window.start_us, window.end_us) == (at[0], run.end_us)  # failures begin at 10 % and never stop
    assert window.expected_suspect == run.rollout.change_id
    assert run.scenario_window == (at[0], run.end_us)
    changes = {c.change_id: c for c in run.changes}
    deploy, config = changes[run.rollout.change_id], changes[f"config-search-ranking-{run_tag}"]
    assert (deploy.cause, deploy.records, deploy.finished_at_us) == (True, 2, at[2])
    assert (config.cause, config.records, config.kind, config.service) == (False, 1, "config", "search")
    assert sum(c.records for c in run.changes) == run.counts["changes"]


def test_the_same_seed_gives_the_same_rollout():
    _, a = bad_deploy(rate=20)
    sim = Simulation(Plan(scenario("bad-deploy"), 20, DURATION_S, SEED, START_US), build_world(SEED, 3000))
    assert [encode(e.record) for e in _events(a)] == [encode(e.record) for t in sim.ticks() for e in t.events]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "bad-deploy"])
def test_other_scenarios_post_no_change_and_their_labels_say_nothing_of_changes(name):
    sim = Simulation(Plan(scenario(name), 100, 60, SEED, START_US), build_world(SEED, 2000))
    events = [e for tick in sim.ticks() for e in tick.events]
    assert not [e for e in events if e.topic == "changes" or isinstance(e.record, Change)]
    assert not [e for e in events if isinstance(e.record, Span) and "service.version" in e.record.attributes]
    summary = sim.summary()
    assert "changes" not in summary.counts and summary.rollout is None and summary.changes == []
    raw = msgspec.json.decode(encode_label(summary))
    assert "rollout" not in raw and "changes" not in raw  # label lines as before
    assert all("expected_suspect" not in w for w in raw["expected_incidents"])


def test_a_labels_file_written_before_changes_existed_still_reads(tmp_path):
    old = {k: v for k, v in msgspec.json.decode(encode_label(bad_deploy()[0].summary())).items()
           if k not in ("rollout", "changes")}
    for window in old["expected_incidents"]:
        del window["expected_suspect"]
    path = tmp_path / "old.jsonl"
    path.write_bytes(msgspec.json.encode(old) + b"\n")
    run = read_run(path)
    assert run.rollout is None and run.changes == [] and run.expected_incidents[0].expected_suspect == ""


@pytest.mark.parametrize(("rate", "surges_before_s"), [(150, STEPS_S[1]), (50, STEPS_S[2])])
def test_the_detector_sees_the_payment_surge_before_everyone_has_the_new_version(rate, surges_before_s):
    """The worker's pure counting and surge detection (warm-up one minute, as the Kafka incident
    tests set it) on the run: at 150 requests/s the 10 % step alone surges on service=payment;
    at 50 requests/s (6–10 failures per 10-s bucket at 10 %, under the detector's start
    threshold of ~13) it surges by the 50 % step. Nothing surges before the deploy."""
    from streams.catalog import load_catalog
    from streams.detect import EngineConfig
    from streams.incidents import load_policy
    from streams.offline import replay
    from streams.surge import SurgeParams

    _, ticks = bad_deploy(rate=rate)
    out = replay(((e.ts_us, e.record) for e in _events(ticks) if not isinstance(e.record, Change)),
                 load_catalog(), load_policy(), EngineConfig(SurgeParams(warmup_buckets=6)))
    starts = [s for s in out.surges if s.phase == "start"]
    assert starts and min(s.started_at_us for s in starts) >= START_US + STEPS_S[0] * SECOND_US
    payment = [s.started_at_us for s in starts if (s.dimension, s.value) == ("service", "payment")]
    assert payment and payment[0] < START_US + surges_before_s * SECOND_US
