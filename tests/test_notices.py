"""Who hears from us and what they read: VIP incident notices and misuse advice (pure), and the
misuse scenario replayed over a simulated week."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from supportlens.contracts import Account, Contact, IncidentEvent
from supportlens.simulator.generate import SECOND_US, Plan, Simulation
from supportlens.simulator.scenarios import scenario
from supportlens.simulator.world import build_world
from streams.catalog import load_catalog
from streams.detect import EngineConfig, SurgeEngine
from streams.incidents import load_policy
from streams.notices import DAY_US, Notifier, load_templates, vip_count
from streams.offline import replay
from streams.surge import SurgeParams

CATALOG = load_catalog()
TEMPLATES = load_templates()
T0 = 1_795_000_000_000_000
ACCOUNTS = {
    "vip-en": Account(account_id="vip-en", name="Acme", tier="vip", locale="en", channel="webhook",
                      webhook_url="https://acme.example/hook"),
    "vip-zh": Account(account_id="vip-zh", name="华东客户", tier="vip", locale="zh-CN", channel="email",
                      contacts=[Contact(email="ops@example.cn")]),
    "std": Account(account_id="std", tier="standard", locale="en", channel="none"),
}


def _event(transition: str, sequence: int, drill: bool = False) -> IncidentEvent:
    return IncidentEvent(incident_id="inc-1", sequence=sequence, transition=transition, at_us=T0 + sequence,  # type: ignore[arg-type]
                         started_at_us=T0, severity="sev2", title="Surge of server error on service payment",
                         reason="test", root_key="service=payment",
                         dimensions={"service": "payment", "diagnosis_class": "server_error"}, drill=drill,
                         resolved_at_us=T0 + 10 if transition == "resolved" else None)


def test_vip_accounts_are_told_once_in_their_locale_and_followed_up_standard_ones_only_counted():
    notifier = Notifier(TEMPLATES, CATALOG, "https://status.example")
    first = notifier.for_incident(_event("declared", 1), ["vip-en", "std"], ACCOUNTS)
    assert [(n.account_id, n.kind) for n in first] == [("vip-en", "incident_declared")]
    again = notifier.for_incident(_event("updated", 2), ["vip-en", "std", "vip-zh", "unknown"], ACCOUNTS)
    assert [(n.account_id, n.kind) for n in again] == [("vip-zh", "incident_declared")]
    assert notifier.for_incident(_event("mitigated", 3), ["vip-en", "vip-zh"], ACCOUNTS) == []
    done = notifier.for_incident(_event("resolved", 4), ["vip-en", "vip-zh"], ACCOUNTS)
    assert sorted((n.account_id, n.kind) for n in done) == [("vip-en", "incident_resolved"),
                                                            ("vip-zh", "incident_resolved")]
    en, zh = first[0], again[0]
    assert en.to == "https://acme.example/hook" and en.channel == "webhook" and en.locale == "en"
    assert "https://status.example" in en.body and "Acme" in en.body
    assert zh.to == "ops@example.cn" and zh.locale == "zh-CN" and "尊敬的 华东客户" in zh.body
    assert "出现问题" in zh.subject
    assert vip_count(["vip-en", "std", "nobody"], ACCOUNTS) == (3, 1)


def test_notice_ids_are_the_idempotency_key_and_drills_are_flagged():
    one = Notifier(TEMPLATES, CATALOG, "").for_incident(_event("declared", 1), ["vip-en"], ACCOUNTS)
    two = Notifier(TEMPLATES, CATALOG, "").for_incident(_event("declared", 1), ["vip-en"], ACCOUNTS)
    assert one == two  # a decision made again (a restarted worker) is the same outbox record
    drill = Notifier(TEMPLATES, CATALOG, "").for_incident(_event("declared", 1, drill=True), ["vip-en"], ACCOUNTS)
    assert drill[0].drill and not one[0].drill


def test_advice_once_when_a_vip_crosses_the_daily_threshold_and_not_again_within_the_week():
    notifier = Notifier(TEMPLATES, CATALOG, "")
    k = TEMPLATES.advice.min_per_day
    out = notifier.for_misuse("vip-zh", "ORDER_BEFORE_LOGIN", k - 1, T0, ACCOUNTS)
    assert out == []
    out = notifier.for_misuse("vip-zh", "ORDER_BEFORE_LOGIN", 1, T0 + 1, ACCOUNTS)
    assert [(n.account_id, n.kind, n.locale) for n in out] == [("vip-zh", "misuse_advice", "zh-CN")]
    assert "POST /v1/login" in out[0].body and "下单前需要先登录" in out[0].subject
    assert notifier.for_misuse("vip-zh", "ORDER_BEFORE_LOGIN", 50, T0 + 2, ACCOUNTS) == []  # same day
    next_day = T0 + DAY_US
    assert notifier.for_misuse("vip-zh", "ORDER_BEFORE_LOGIN", k, next_day, ACCOUNTS) == []  # within the week
    week_later = T0 + TEMPLATES.advice.every_days * DAY_US
    assert len(notifier.for_misuse("vip-zh", "ORDER_BEFORE_LOGIN", k, week_later, ACCOUNTS)) == 1
    assert notifier.for_misuse("std", "ORDER_BEFORE_LOGIN", 10 * k, T0, ACCOUNTS) == []  # standard: no advice
    assert notifier.for_misuse("vip-en", "NOT_A_CODE", 10 * k, T0, ACCOUNTS) == []  # uncatalogued: nothing to say
    assert len(notifier.for_misuse("vip-zh", "RATE_LIMITED", k, T0, ACCOUNTS)) == 1  # another pattern


@pytest.mark.parametrize("days", [8])
def test_the_misuse_scenario_over_a_simulated_week_gives_one_advice_per_vip_and_pattern(days):
    """The misuse wave runs every day; its VIP account gets the advice on day 1, not again until day 8."""
    world = build_world(7, 2000)
    start = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)
    config = EngineConfig(SurgeParams(warmup_buckets=6))
    notifier = Notifier(TEMPLATES, CATALOG, "")
    engine = SurgeEngine(config, load_policy(), CATALOG.team_of, notifier=notifier, accounts={})
    advice = []
    for day in range(days):
        plan = Plan(scenario("misuse-wave"), 30, 300, 7 + day,
                    int((start + timedelta(days=day)).timestamp() * SECOND_US))
        sim = Simulation(plan, world)
        records = [(e.ts_us, e.record) for e in sim.accounts()]
        records += [(e.ts_us, e.record) for tick in sim.ticks() for e in tick.events]
        out = replay(records, CATALOG, load_policy(), config, engine=engine)
        advice += [(day, n.account_id, n.attributes.get("code")) for n in out.notifications if n.kind == "misuse_advice"]
        assert not out.incidents, "a misuse wave is the customer's to fix, not an incident"
    misuse_account = world.misuse_account
    assert misuse_account in world.vip_accounts
    assert advice == [(0, misuse_account, "ORDER_BEFORE_LOGIN"), (7, misuse_account, "ORDER_BEFORE_LOGIN")]


@pytest.mark.parametrize("name", ["service-outage", "bad-release"])
def test_a_worker_catching_up_on_a_backlog_tells_the_same_vip_accounts_as_one_that_kept_up(name):
    # Behind, a worker reads minutes of event time between two of its clocks: one step of the
    # engine then closes the rest of a surge declared in the step before, and the accounts its
    # later buckets hurt are first seen when the incident is already mitigated. They were
    # affected, and must be told.
    world = build_world(11, 3000)
    plan = Plan(scenario(name), 80, 1000, 11, int(datetime(2026, 11, 22, 7, 30, tzinfo=timezone.utc).timestamp()) * SECOND_US)
    simulation = Simulation(plan, world)
    records = [(e.ts_us, e.record) for e in simulation.accounts()]
    records += [(e.ts_us, e.record) for tick in simulation.ticks() for e in tick.events]
    onset = plan.window_us[0] + 60 * SECOND_US  # declared by then (in its fourth bucket, the latest)
    # no severity to raise on the way: an "updated" transition would tell everyone affected so far
    policy = load_policy()
    policy = msgspec.structs.replace(policy, severity=msgspec.structs.replace(policy.severity, sev2_users=10**6,
                                                                              sev1_users=10**6))

    def told(clock_after_onset_s: int) -> dict[str, list[str]]:
        config = EngineConfig(SurgeParams(warmup_buckets=6))
        engine = SurgeEngine(config, policy, CATALOG.team_of, notifier=Notifier(TEMPLATES, CATALOG, ""),
                             accounts={})
        out = replay([r for r in records if r[0] < onset], CATALOG, policy, config, engine=engine)
        assert [e.transition for e in out.incidents][0] == "declared"
        out.extend(replay([r for r in records if r[0] >= onset], CATALOG, policy, config, engine=engine,
                          clock_every_s=clock_after_onset_s))
        assert [e.transition for e in out.incidents if e.transition in ("declared", "resolved")] == \
            ["declared", "resolved"], [(e.transition, e.root_key) for e in out.incidents]
        return {kind: sorted(n.account_id for n in out.notifications if n.kind == kind)
                for kind in ("incident_declared", "incident_resolved")}

    kept_up, behind = told(1), told(900)
    assert kept_up["incident_declared"] and behind == kept_up
    assert behind["incident_resolved"] == behind["incident_declared"]  # each told account followed up
