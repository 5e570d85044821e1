"""The simulator's sequence misuse (issue #18), without Kafka: one standard account's integration
reuses an idempotency key with another body, its payment fails minutes later at the payment
service, and the labels say that the report of that failure is the misuse — against the records."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from datetime import datetime, timezone

import pytest

from supportlens.contracts import FaultReport, Span, encode
from supportlens.simulator import generate
from supportlens.simulator.generate import SECOND_US, Plan, Simulation
from supportlens.simulator.labels import ReportLabel, RequestLabel, encode_label, read_run
from supportlens.simulator.misuse import (
    CONFIRM, FAILS_AFTER_US, ORDER, REPORTED_AFTER_US, REUSED_AFTER_US, SPREAD, SequenceMisuse, episode_count,
)
from supportlens.simulator.scenarios import SCENARIOS, scenario
from supportlens.simulator.world import World, build_world, integration_user
from streams.catalog import load_catalog
from streams.correlate import add_span, build_request
from streams.diagnose import diagnose_report, primary_request_id

START_US = int(datetime(2026, 11, 22, 4, tzinfo=timezone.utc).timestamp()) * SECOND_US
SEED, USERS = 7, 2000
CATALOG = load_catalog()


def run(name: str = "normal", duration: int = 600, rate: float = 40, seed: int = SEED, world: World | None = None):
    sim = Simulation(Plan(scenario(name), rate, duration, seed, START_US), world or build_world(seed, USERS))
    ticks = list(sim.ticks())
    return sim, ticks


def episode_ids(sim: Simulation) -> set[str]:
    """The request and report ids of the run's episodes: the keys of all their records."""
    truth = sim.summary().sequence_misuse
    assert truth is not None
    return {i for e in truth.episodes for i in (e.earlier_request_id, e.misuse_request_id, e.failure_request_id,
                                               e.report_id)}


def without_episodes(ticks, ids: set[str]) -> tuple[list[bytes], list[bytes]]:
    """Every other record (topic and bytes) and label line of a run, in order."""
    records = [e.topic.encode() + b" " + encode(e.record) for t in ticks for e in t.events if e.key not in ids]
    labels = [encode_label(label) for t in ticks for label in t.labels
              if not ({getattr(label, "request_id", None), getattr(label, "report_id", None)} & ids)]
    return records, labels


class _Off(SequenceMisuse):
    """The module disabled: no episode, no label (and none of its draws)."""

    def __init__(self, plan, world) -> None:
        self.pending, self.episodes, self.user = [], [], None


def test_the_account_is_the_first_standard_one_with_users_and_the_world_is_otherwise_unchanged():
    world = build_world(SEED, USERS)
    with_users = {u.account_id for u in world.users}
    first = next(a for a in world.accounts if a.tier == "standard" and a.account_id in with_users)
    assert world.sequence_misuse_account == first.account_id
    assert first.account_id not in world.vip_accounts and first.account_id != world.misuse_account
    assert world.misuse_account == world.accounts[0].account_id  # the misuse wave's VIP, as before
    user = integration_user(world, first.account_id)
    assert user is not None and user.user_id == min(u.user_id for u in world.users if u.account_id == first.account_id)
    assert build_world(SEED, USERS) == world  # no draw of its own: the same world every time


@pytest.mark.parametrize(("duration", "n"), [(10, 1), (60, 1), (199, 1), (250, 2), (600, 5), (3600, 5)])
def test_one_episode_per_100_s_at_least_one_at_most_five(duration, n):
    assert episode_count(duration) == n


def test_the_label_matches_the_records():
    sim, ticks = run()
    summary = sim.summary()
    truth = summary.sequence_misuse
    world = sim.world
    assert truth is not None and len(truth.episodes) == 5
    assert (truth.account_id, truth.rule, truth.code, truth.surfaced_as, truth.surfaced_in) == (
        world.sequence_misuse_account, "idempotency-key-reuse", "IDEMPOTENCY_KEY_REUSED", "server_error", "payment")
    account = next(a for a in world.accounts if a.account_id == truth.account_id)
    assert account.tier == "standard" and truth.account_id != world.misuse_account
    user = integration_user(world, truth.account_id)
    assert user is not None and truth.user_id == user.user_id

    spans: dict[str, list[Span]] = defaultdict(list)
    reports: dict[str, FaultReport] = {}
    for tick in ticks:
        for e in tick.events:
            if isinstance(e.record, Span):
                spans[e.record.request_id].append(e.record)
            elif isinstance(e.record, FaultReport):
                reports[e.record.report_id] = e.record
    labels = {getattr(label, "request_id", None) or label.report_id: label for t in ticks for label in t.labels}
    lo, hi = (START_US + int(600 * f * SECOND_US) for f in SPREAD)
    misuse_at = [e.misuse_at_us for e in truth.episodes]
    assert misuse_at == sorted(misuse_at)

    def sides(request_id: str) -> tuple[Span | None, list[Span]]:
        got = spans[request_id]
        client = [s for s in got if s.side == "client"]
        assert len(client) == int(user.consented)  # the client span only with consent
        return (client[0] if client else None), sorted((s for s in got if s.side == "server"), key=lambda s: s.start_us)

    for episode in truth.episodes:
        orders = []
        for request_id in (episode.earlier_request_id, episode.misuse_request_id):
            client, servers = sides(request_id)
            root = servers[0]
            assert (root.service, root.operation) == ("edge-gateway", ORDER.name)
            assert [s.service for s in servers] == list(ORDER.services())  # its whole chain, all answering 201
            assert all(s.status == "ok" and s.http_status == 201 and s.user_id == user.user_id for s in servers)
            assert root.attributes["team"] == "sre"
            pair = (root.attributes["idempotency_key"], root.attributes["body_sha256"])
            if client is not None:
                assert client.status == "ok" and client.http_status == 201 and client.attributes["screen"] == "checkout"
                assert (client.attributes["idempotency_key"], client.attributes["body_sha256"]) == pair
            label = labels[request_id]
            assert isinstance(label, RequestLabel) and (label.expected_class, label.operation) == ("ok", ORDER.name)
            assert label.server_spans == 5 and label.client_span_emitted == user.consented
            orders.append((label.start_us, pair))
        (earlier_at, (key, body)), (reused_at, (reused_key, other_body)) = orders
        assert reused_key == key and other_body != body  # the same key, another body
        assert lo <= earlier_at < hi and reused_at == episode.misuse_at_us
        assert REUSED_AFTER_US[0] <= reused_at - earlier_at <= REUSED_AFTER_US[1]

        client, servers = sides(episode.failure_request_id)
        gateway, payment = servers
        assert (gateway.service, gateway.operation, gateway.http_status, gateway.error_code, gateway.status) == (
            "edge-gateway", CONFIRM.name, 502, "UPSTREAM_ERROR", "error")
        assert (payment.service, payment.http_status, payment.error_code, payment.status) == (
            "payment", 500, "AMOUNT_MISMATCH", "error")
        assert "idempotency_key" not in gateway.attributes
        failed = labels[episode.failure_request_id]
        assert isinstance(failed, RequestLabel)
        assert (failed.expected_class, failed.failing_service, failed.operation) == ("server_error", "payment", CONFIRM.name)
        assert FAILS_AFTER_US[0] <= failed.start_us - reused_at <= FAILS_AFTER_US[1]
        if client is not None:
            assert (client.status, client.http_status, client.error_code) == ("error", 502, "UPSTREAM_ERROR")

        report = reports[episode.report_id]
        assert report.request_ids == [episode.failure_request_id, episode.misuse_request_id, episode.earlier_request_id]
        assert [s.request_id for s in report.client_log] == report.request_ids[::-1]
        assert all(s.side == "client" for s in report.client_log)
        answered = failed.start_us + report.client_log[-1].duration_us
        assert report.received_at_us == episode.report_received_at_us
        assert REPORTED_AFTER_US[0] <= report.received_at_us - answered <= REPORTED_AFTER_US[1]
        assert (report.user_id, report.account_id, report.client_ip, report.locale, report.region) == (
            user.user_id, user.account_id, user.client_ip, user.locale, user.region.name)
        assert report.error_code == "UPSTREAM_ERROR" and report.user_message
        said = labels[episode.report_id]
        assert isinstance(said, ReportLabel) and said.expected_class == "client_misuse"  # the truth, not the symptom
        assert said.request_ids == report.request_ids and said.received_at_us == report.received_at_us

    # each record is in the tick of the second it falls in (or the tail, after the run): time order kept
    ids = episode_ids(sim)
    for tick in ticks:
        for e in tick.events:
            if e.key in ids:
                second = (e.ts_us - START_US) // SECOND_US
                assert second == tick.second if second < 600 else tick.second == 600
    # the counts include them, as the count checks against Kafka expect
    assert summary.counts == dict(sorted(Counter(e.topic for t in ticks for e in t.events).items()))
    requests = [label for t in ticks for label in t.labels if isinstance(label, RequestLabel)]
    assert summary.requests == len(requests)
    assert summary.classes == dict(sorted(Counter(r.expected_class for r in requests).items()))
    assert summary.visible_requests == sum(1 for r in requests if r.server_spans or r.client_span_emitted)
    assert summary.report_classes == dict(sorted(Counter(
        label.expected_class for t in ticks for label in t.labels if isinstance(label, ReportLabel)).items()))


def test_alone_the_failure_looks_like_our_payment_service_failed():
    """What the offline path (no sequences) says of each episode's report: the symptom. The stream
    traces it to the misuse before it (streams/sequences.py, tested on Kafka)."""
    sim, ticks = run(duration=300)
    pending: dict = {}
    reports = {}
    for e in (e for t in ticks for e in t.events):
        if isinstance(e.record, Span):
            pending[e.record.request_id], _ = add_span(pending.get(e.record.request_id), e.record, 0.0)
        elif isinstance(e.record, FaultReport):
            reports[e.record.report_id] = e.record
    for episode in sim.summary().sequence_misuse.episodes:
        report = reports[episode.report_id]
        request = build_request(primary_request_id(report), pending[primary_request_id(report)], CATALOG)
        diagnosis = diagnose_report(report, request, CATALOG, report.received_at_us).diagnosis
        assert (diagnosis.cls, diagnosis.service, diagnosis.code) == ("server_error", "payment", "AMOUNT_MISMATCH")


def test_the_records_are_what_the_catalogs_rule_reads():
    rule = CATALOG.sequences["idempotency-key-reuse"]
    sim, _ = run(duration=300)
    truth = sim.summary().sequence_misuse
    assert (rule.operation, rule.key, rule.value, rule.code) == (ORDER.name, "idempotency_key", "body_sha256", truth.code)
    assert truth.surfaced_as in rule.surfaces_as and truth.surfaced_in in rule.surfaces_in
    for episode in truth.episodes:  # every report is within the rule's reach of its misuse
        assert 0 < episode.report_received_at_us - episode.misuse_at_us <= rule.surfaces_within_s * SECOND_US


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others():
    a, ticks_a = run(duration=300)
    b, ticks_b = run(duration=300)
    c, _ = run(duration=300, seed=SEED + 1)
    assert a.summary().sequence_misuse == b.summary().sequence_misuse
    ids = episode_ids(a)
    assert [encode(e.record) for t in ticks_a for e in t.events if e.key in ids] == [
        encode(e.record) for t in ticks_b for e in t.events if e.key in ids]
    assert c.summary().sequence_misuse.episodes != a.summary().sequence_misuse.episodes


@pytest.mark.parametrize("name", ["bad-deploy", "misuse-wave", "service-outage"])
def test_every_other_record_and_label_is_byte_identical_with_the_episodes_disabled(monkeypatch, name):
    sim, ticks = run(name, duration=300, rate=60)
    ids = episode_ids(sim)
    monkeypatch.setattr(generate, "SequenceMisuse", _Off)
    off, off_ticks = run(name, duration=300, rate=60)
    assert off.summary().sequence_misuse is None
    assert without_episodes(ticks, ids) == without_episodes(off_ticks, set())
    # the run's counts differ by the episodes' records only
    episodes = Counter(e.topic for t in ticks for e in t.events if e.key in ids)
    assert Counter(sim.summary().counts) - Counter(off.summary().counts) == episodes
    assert sim.summary().requests - off.summary().requests == 3 * len(sim.summary().sequence_misuse.episodes)


def test_without_consent_the_server_spans_still_come_and_the_report_carries_the_apps_log():
    world = build_world(SEED, USERS)
    user = integration_user(world, world.sequence_misuse_account)
    assert user is not None and user.consented  # this world's integration consents: withdraw it here
    users = tuple(dataclasses.replace(u, consented=False) if u == user else u for u in world.users)
    sim, ticks = run(duration=150, world=dataclasses.replace(world, users=users))
    (episode,) = sim.summary().sequence_misuse.episodes
    mine = [e for t in ticks for e in t.events if e.key in episode_ids(sim)]
    assert {e.topic for e in mine} == {"server-spans", "fault-reports"}
    assert sum(e.topic == "server-spans" for e in mine) == 5 + 5 + 2
    labels = [label for t in ticks for label in t.labels if isinstance(label, RequestLabel)
              and label.request_id in episode_ids(sim)]
    assert len(labels) == 3 and not any(label.client_span_emitted for label in labels)
    (report,) = [e.record for e in mine if isinstance(e.record, FaultReport)]
    assert len(report.client_log) == 3  # attached by the user with the report, as the traffic's reports are


def test_a_world_without_such_an_account_has_no_episode_and_no_label(monkeypatch):
    world = dataclasses.replace(build_world(SEED, USERS), sequence_misuse_account="")
    sim, ticks = run(duration=120, world=world)
    assert sim.summary().sequence_misuse is None
    monkeypatch.setattr(generate, "SequenceMisuse", _Off)
    _, off = run(duration=120, world=world)
    assert without_episodes(ticks, set()) == without_episodes(off, set())


def test_the_labels_file_carries_the_episodes(tmp_path):
    sim, ticks = run(duration=200)
    path = tmp_path / "labels.jsonl"
    with path.open("wb") as handle:
        for tick in ticks:
            handle.write(b"".join(encode_label(label) for label in tick.labels))
        handle.write(encode_label(sim.summary()))
    assert read_run(path).sequence_misuse == sim.summary().sequence_misuse
    assert len(read_run(path).sequence_misuse.episodes) == 2


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_has_its_episodes(name):
    sim, _ = run(name, duration=200, rate=10)
    truth = sim.summary().sequence_misuse
    assert truth is not None and len(truth.episodes) == 2
