"""Suspect changes: which recent deploys, config changes, flags and infrastructure changes an
incident names, ranked (pure, then through the surge engine's incident events)."""

from __future__ import annotations

import msgspec
import pytest

from supportlens.contracts import Account, Change, IncidentEvent, SignalClock, decode, encode
from streams.detect import Outputs, SurgeEngine, EngineConfig
from streams.incidents import load_policy
from streams.catalog import load_catalog
from streams.notices import Notifier, load_templates
from streams.suspects import SuspectRules, rank
from test_incidents import at, start, team_of

RULES = SuspectRules()


def incident(dimensions: dict[str, str], root: str, services: list[str], started_s: float = 0,
             drill: bool = False) -> IncidentEvent:
    return IncidentEvent(incident_id="inc-1", sequence=1, transition="declared", at_us=at(started_s + 10),
                         started_at_us=at(started_s), severity="sev3", reason="test", root_key=root,
                         dimensions=dimensions, services=services, drill=drill)


def change(change_id: str, service: str, started_s: float, kind: str = "deploy", **fields) -> Change:
    return Change(change_id=change_id, kind=kind, service=service, started_at_us=at(started_s), **fields)  # type: ignore[arg-type]


PAYMENT = incident({"service": "payment", "diagnosis_class": "server_error"}, "service=payment", ["payment"])


def test_the_deploy_of_the_failing_service_minutes_before_is_the_top_suspect_and_says_why():
    changes = [change("c-deploy", "payment", -180, version="1.4.2", from_version="1.4.1"),
               change("c-config", "search", -1200, kind="config"),
               change("c-orders", "payment", -2400, kind="config")]
    ranked = rank(PAYMENT, changes, RULES)
    assert [s.change_id for s in ranked] == ["c-deploy", "c-orders"]  # search touches nothing that fails
    top = ranked[0]
    assert top.reason == "payment 1.4.2 deployed 3 min before the surge, in the failing hop"
    assert ranked[1].reason == "payment configuration changed 40 min before the surge, in the failing hop"
    assert 0 < ranked[1].score < top.score <= 1


def test_nearer_is_likelier_and_the_window_bounds_the_past():
    ranked = rank(PAYMENT, [change("old", "payment", -3000), change("near", "payment", -60),
                            change("too-old", "payment", -3700), change("after", "payment", +30)], RULES)
    assert [s.change_id for s in ranked] == ["after", "near", "old"]
    assert ranked[0].reason.endswith("30 s after the surge began, in the failing hop")
    assert rank(PAYMENT, [change("much-later", "payment", +600)], RULES) == []


def test_a_failing_hop_that_is_not_the_root_ranks_below_the_root_services_change():
    chain = incident({"service": "payment"}, "service=payment", ["payment", "ledger"])
    ranked = rank(chain, [change("ledger", "ledger", -60), change("payment", "payment", -600)], RULES)
    assert [s.change_id for s in ranked] == ["payment", "ledger"]
    assert ranked[1].reason.endswith("in a failing hop")


def test_a_client_release_is_a_suspect_of_its_surging_app_version_on_its_platform_only():
    release = incident({"app_version": "5.2.0", "platform": "android"}, "app_version=5.2.0", ["mobile-app"])
    android = change("android", "mobile-app", -600, version="5.2.0", platform="android")
    ios = change("ios", "mobile-app", -600, version="5.2.0", platform="ios")
    other = change("other", "mobile-app", -600, version="5.1.9", platform="android")
    ranked = rank(release, [android, ios, other], RULES)
    assert [s.change_id for s in ranked] == ["android", "other"]  # 'other' is in the app that fails
    assert ranked[0].reason == "mobile-app 5.2.0 deployed 10 min before the surge, the surging app version"
    assert ranked[0].score > ranked[1].score


def test_a_change_in_another_region_is_left_out_and_one_in_the_affected_region_is_a_weak_suspect():
    isp = incident({"region": "cn-east", "network": "China Telecom"}, "network=China Telecom", [])
    ranked = rank(isp, [change("east", "edge-gateway", -300, kind="infra", region="cn-east"),
                        change("west", "edge-gateway", -300, kind="infra", region="eu-west"),
                        change("everywhere", "search", -300, kind="config")], RULES)
    assert [s.change_id for s in ranked] == ["east"]
    assert ranked[0].reason == "edge-gateway infrastructure changed 5 min before the surge, in the affected region cn-east"
    assert ranked[0].score < 0.5


def test_drills_and_real_changes_never_explain_each_other_and_top_bounds_the_list():
    drill = incident(PAYMENT.dimensions, PAYMENT.root_key, PAYMENT.services, drill=True)
    assert rank(drill, [change("real", "payment", -60)], RULES) == []
    many = [change(f"c{i}", "payment", -60 * i) for i in range(1, 8)]
    assert [s.change_id for s in rank(PAYMENT, many, RULES)] == ["c1", "c2", "c3"]


def test_a_change_with_a_bad_field_is_refused_naming_it():
    good = encode(change("c1", "payment", 0, version="1.4.2"))
    assert decode(good, Change).version == "1.4.2"
    bad = good.replace(b'"deploy"', b'"rollback"')
    with pytest.raises(Exception, match="kind"):
        decode(bad, Change)


# ---- through the engine ---------------------------------------------------------------------

VIP = Account(account_id="acct-vip", name="Big Shop", tier="vip", channel="webhook",
              webhook_url="https://hooks.example.com/x")


def notifier() -> Notifier:
    return Notifier(load_templates(), load_catalog(), "https://status.example")


def engine() -> SurgeEngine:
    return SurgeEngine(EngineConfig(), load_policy(), team_of, notifier=notifier(), accounts={"acct-vip": VIP})


def declare_payment(e: SurgeEngine) -> list[IncidentEvent]:
    return e._with_notices(Outputs(incidents=e.book.on_surges([start("service=payment", 0, users=20)]))).incidents


def test_a_declared_incident_names_the_deploy_and_a_change_posted_later_updates_it():
    e = engine()
    e.on_change(change("c-deploy", "payment", -300, version="1.4.2"))
    [declared] = declare_payment(e)
    assert [s.change_id for s in declared.suspects] == ["c-deploy"]
    late = e.on_change(change("c-flag", "payment", -30, kind="feature_flag"))
    [updated] = late.incidents
    assert updated.transition == "updated" and updated.incident_id == declared.incident_id
    assert updated.reason == "suspect change: payment feature flag changed 30 s before the surge, in the failing hop"
    assert [s.change_id for s in updated.suspects] == ["c-flag", "c-deploy"]
    # the same change posted again (a retry) changes nothing
    assert e.on_change(change("c-flag", "payment", -30, kind="feature_flag")).incidents == []
    # an unrelated change neither updates the incident nor joins its suspects
    assert e.on_change(change("c-search", "search", -20, kind="config")).incidents == []


def test_customer_notices_never_show_the_suspects():
    e = engine()
    e.on_change(change("c-deploy", "payment", -300, version="1.4.2", description="secret internal rollout"))
    [declared] = declare_payment(e)
    assert declared.suspects
    notices = notifier().for_incident(declared, ["acct-vip"], {"acct-vip": VIP})
    assert [n.kind for n in notices] == ["incident_declared"]
    for notice in notices:
        text = msgspec.json.encode(notice).decode()
        assert "c-deploy" not in text and "1.4.2" not in text and "secret" not in text and "deployed" not in text


def test_a_scenario_without_changes_names_no_suspect():
    e = engine()
    [declared] = declare_payment(e)
    assert declared.suspects == [] and b"suspects" not in encode(declared)


def test_old_changes_are_forgotten_once_no_open_incident_can_use_them():
    e = engine()
    e.on_clock(SignalClock(source="w", watermark_us=at(0)), wall_s=0.0)  # real traffic's time: T0
    e.on_change(change("ancient", "payment", -3 * 3600))
    e.on_change(change("recent", "payment", -60))
    assert set(e.state.changes) == {"recent"}
    # a drill replays a past day: its changes keep its own time, not real traffic's
    e.on_change(change("drill-deploy", "payment", -30 * 86_400, drill=True))
    e.on_change(change("recent-2", "payment", -30))
    assert set(e.state.changes) == {"recent", "drill-deploy", "recent-2"}


def test_supportlens_incidents_shows_the_top_suspect_with_its_change_id():
    from rich.console import Console

    from supportlens.support.render import incidents_table

    e = engine()
    e.on_change(change("chg-77", "payment", -180, version="1.4.2"))
    e.on_change(change("chg-78", "payment", -1200, kind="config"))
    [declared] = declare_payment(e)
    console = Console(record=True, width=400)
    console.print(incidents_table([declared]))
    text = console.export_text()
    assert "payment 1.4.2 deployed 3 min before the surge, in the failing hop [chg-77] (+1 more)" in text
