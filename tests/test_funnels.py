"""Funnels (issue #18) on real ClickHouse: ``windowFunnel`` over simulated behaviour paths.

The simulator walks consented users through the funnels of ``funnels.toml`` with a stuck step
for one app version on one platform, and has some users withdraw consent; its labels say which
(``RunLabel.behaviour``). The funnel's drop step per app version and platform must match that
truth, every count must match a recount from the events (withdrawn users left out), and a
hand-made pair of periods checks the change against the period before.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from helpers import insert_records, own_database
from supportlens.cli import app
from supportlens.contracts import BehaviourEvent
from supportlens.errors import UserError
from supportlens.simulator.behaviour import FUNNEL_PATHS, WITHDRAWN
from supportlens.simulator.generate import Plan, Simulation
from supportlens.simulator.labels import BehaviourLabel
from supportlens.simulator.scenarios import scenario
from supportlens.simulator.world import build_world
from supportlens.store.funnels import Funnel, funnel_report, load_funnels, parse_by, pick, step_counts, stuck_groups

pytestmark = pytest.mark.clickhouse

US = 1_000_000
HOUR_US = 3600 * US
DAY_US = 24 * HOUR_US
# yesterday 08:00 UTC: in the past and within the behaviour table's retention, whatever the hour
START = (time.time_ns() // 1000 // DAY_US - 1) * DAY_US + 8 * HOUR_US
SIM_UNTIL = START + HOUR_US  # the simulated run (5 min) and its sessions fit in this hour
MADE = START - 2 * DAY_US  # the hand-made periods: [MADE - 1 h, MADE) and [MADE, MADE + 1 h)
FUNNELS = load_funnels()
CHECKOUT = pick(FUNNELS, "checkout")[0]


@dataclass
class Filled:
    client: Any
    settings: Any
    events: list[BehaviourEvent]
    truth: BehaviourLabel


def _made(user: str, steps: list[str], at_us: int, app_version: str, gap_s: int = 60) -> list[BehaviourEvent]:
    return [BehaviourEvent(event_id=f"{user}-{at_us}-{i}", user_id=user, ts_us=at_us + i * gap_s * US, name=step,
                           screen="s", app_version=app_version, platform="ios", region="eu-west")
            for i, step in enumerate(steps)]


def _made_periods() -> list[BehaviourEvent]:
    """Version 7.0.0: before, 8 users complete checkout; now 10 enter, 5 complete, 5 stop after
    start_checkout; one more starts but goes on after the window (30 min): only entered.
    Version 7.0.1: one user walks it all and then withdraws consent; another withdrew before."""
    steps = list(CHECKOUT.steps)
    events: list[BehaviourEvent] = []
    for i in range(8):
        events += _made(f"before-{i}", steps, MADE - HOUR_US + i * 60 * US, "7.0.0")
    for i in range(10):
        events += _made(f"now-{i}", steps if i < 5 else steps[:2], MADE + i * 60 * US, "7.0.0")
    events += _made("slow", steps, MADE + 60 * US, "7.0.0", gap_s=31 * 60)[:2]  # 31 min apart: level 1
    events += _made("withdrawn-later", steps, MADE + 120 * US, "7.0.1")
    events += _made("withdrawn-later", [WITHDRAWN], MADE + 50 * 60 * US, "7.0.1")
    events += _made("withdrawn-before", steps, MADE - 30 * 60 * US, "7.0.1")  # in the period before ...
    events += _made("withdrawn-before", [WITHDRAWN], MADE + 10 * US, "7.0.1")  # ... withdrawn in this one
    return events


@pytest.fixture(scope="module")
def filled(clickhouse_target, tmp_path_factory) -> Filled:
    sim = Simulation(Plan(scenario("normal"), 400, 300, 3, START), build_world(3, 4000))
    events = [e.record for tick in sim.ticks() for e in tick.events if isinstance(e.record, BehaviourEvent)]
    truth = sim.summary().behaviour
    assert truth is not None
    settings, client = own_database(clickhouse_target.dsn, tmp_path_factory.mktemp("funnels-state"))
    insert_records(client, "behaviour", events + _made_periods())
    yield Filled(client, settings, events, truth)
    client.command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")


def _recount(events: list[BehaviourEvent], funnel: Funnel, until_us: int, skip: set[str]) -> dict[tuple, list[int]]:
    """Per (app_version, platform): users reaching each step — the funnel counted in Python."""
    steps = list(funnel.steps)
    walks: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    for e in events:
        if e.name in steps and e.ts_us < until_us and e.user_id not in skip:
            walks[(e.user_id, e.app_version, e.platform)].append((e.ts_us, e.name))
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(steps))
    for (_, version, platform), walk in walks.items():
        walk.sort()
        best = 0
        for start, name in walk:
            if name != steps[0]:
                continue
            level, at = 1, start
            for ts, later in walk:
                if level < len(steps) and later == steps[level] and at < ts <= start + funnel.window_s * US:
                    level, at = level + 1, ts
            best = max(best, level)
        for k in range(best):
            counts[(version, platform)][k] += 1
    return counts


def test_the_drop_step_per_app_version_and_platform_is_the_simulated_stuck_step(filled):
    report = funnel_report(filled.client, FUNNELS, START, SIM_UNTIL, ("app_version", "platform"))
    stuck = filled.truth.stuck
    expected = {f.funnel: f.drop_step for f in filled.truth.funnels}
    assert stuck.step != expected[stuck.funnel]  # else the test could not tell them apart
    seen = 0
    for result in report.funnels:
        assert result.total.now.drop_step == expected[result.funnel]
        for group in result.groups:
            key = (group.group["app_version"], group.group["platform"])
            assert group.now.entered >= 20, group  # enough users in every group for the truth to show
            if result.funnel == stuck.funnel and key == (stuck.app_version, stuck.platform):
                seen += 1
                assert group.now.drop_step == stuck.step
                assert group.now.drop_share == pytest.approx(stuck.drop_share, abs=0.1)
            else:
                assert group.now.drop_step == expected[result.funnel], (result.funnel, group)
    assert seen == 1
    [worst] = stuck_groups(next(r for r in report.funnels if r.funnel == stuck.funnel))
    assert worst.group == {"app_version": stuck.app_version, "platform": stuck.platform}
    assert not stuck_groups(next(r for r in report.funnels if r.funnel != stuck.funnel))
    # the simulator's paths: the same funnels as the file the queries read
    assert {p.name: [a for a, _ in p.steps] for p in FUNNEL_PATHS} == {f.name: list(f.steps) for f in FUNNELS}


def test_every_count_is_the_recount_without_the_users_who_withdrew(filled):
    withdrawn = {w.user_id for w in filled.truth.withdrawn}
    stepped = {e.user_id for e in filled.events if e.name in CHECKOUT.steps}
    assert len(withdrawn & stepped) >= 5  # users with checkout steps before they withdrew: they must not count
    assert any(e.name == WITHDRAWN for e in filled.events)
    for e in filled.events:  # nothing of theirs after they withdrew
        at = next((w.at_us for w in filled.truth.withdrawn if w.user_id == e.user_id), None)
        assert at is None or e.ts_us <= at
    [result] = funnel_report(filled.client, (CHECKOUT,), START, SIM_UNTIL, ("app_version", "platform")).funnels
    got = {(g.group["app_version"], g.group["platform"]): g.now.reached for g in result.groups}
    assert got == dict(_recount(filled.events, CHECKOUT, SIM_UNTIL, withdrawn))
    assert got != dict(_recount(filled.events, CHECKOUT, SIM_UNTIL, set()))  # leaving them in would show
    assert result.total.now.entered == sum(n[0] for n in got.values())


def test_the_change_against_the_period_before(filled):
    [result] = funnel_report(filled.client, (CHECKOUT,), MADE, MADE + HOUR_US, ("app_version",)).funnels
    [group] = result.groups  # 7.0.1 is nobody's: its users withdrew consent (one of them only later)
    assert group.group == {"app_version": "7.0.0"}
    assert group.now.reached == [11, 10, 5, 5]
    assert group.now.drop_step == "enter_payment" and group.now.drop_share == 0.5
    assert group.before.reached == [8, 8, 8, 8] and group.before.drop_step == ""
    assert group.before.completed_share == 1.0
    assert group.completed_change == pytest.approx(5 / 11 - 1, abs=1e-4)
    assert result.total.now == group.now and result.total.before == group.before
    # the period before alone: the user who withdrew after it is left out of it too
    [earlier] = funnel_report(filled.client, (CHECKOUT,), MADE - HOUR_US, MADE, ("app_version",)).funnels
    assert [g.group for g in earlier.groups] == [{"app_version": "7.0.0"}]
    assert earlier.groups[0].completed_change is None  # nobody the hour before that


def test_a_withdrawn_user_is_in_no_count_of_any_dimension(filled):
    for by in ("app_version", "platform", "region", "app_version,platform,region"):
        report = funnel_report(filled.client, FUNNELS, MADE - HOUR_US, MADE + HOUR_US, parse_by(by))
        for result in report.funnels:
            for group in result.groups:
                assert "7.0.1" not in group.group.values()
            if result.funnel == "checkout":
                assert result.total.now.entered == 11 + 8  # both hours, no one withdrawn


def test_step_counts_name_the_largest_loss():
    counts = step_counts(("a", "b", "c"), {1: 2, 2: 6, 3: 2})
    assert counts.reached == [10, 8, 2] and counts.drop_step == "c" and counts.drop_share == 0.75
    assert step_counts(("a", "b"), {}).drop_step == ""


@pytest.mark.parametrize(("text", "words"), [
    ("[[funnel]]\nname = 'x'\nsteps = ['only']\n", "funnel[0] (x).steps: expected `array` of length >= 2"),
    ("[[funnel]]\nname = 'x'\nwindow = 'soon'\nsteps = ['a', 'b']\n", "funnel[0] (x).window: 'soon' is not a duration"),
    ("[[funnel]]\nname = 'Check Out'\nsteps = ['a', 'b']\n", "funnel[0] (Check Out).name"),
    ("[[funnel]]\nname = 'x'\nstep = ['a', 'b']\n", "funnel[0] (x): unknown field `step`"),
    ("[[funnel]]\nname = 'x'\nsteps = ['a', 'a']\n", "funnel[0] (x).steps: 'a' is listed twice"),
    ("[[funnel]]\nname = 'x'\nsteps = ['a', 'b']\n[[funnel]]\nname = 'x'\nsteps = ['a', 'b']\n",
     "funnel[1] (x).name: 'x' is listed twice"),
    ("[[funnel]]\nname = 'x'\nsteps = ['a', 3]\n", "funnel[0] (x).steps[1]: expected `str`, got `int`"),
    ("funnel = []\n", "funnel: expected `array` of length >= 1"),
    ("[[funnel]\n", "is not valid TOML"),
])
def test_a_broken_funnels_file_is_an_error_naming_the_field(tmp_path, text, words):
    path = tmp_path / "funnels.toml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_funnels(path)
    assert words in caught.value.message and str(path) in caught.value.message
    assert caught.value.hint


def test_the_packaged_funnels_file_loads():
    assert [f.name for f in FUNNELS] == ["checkout", "onboarding"]
    assert all(f.window_s == 1800 and len(f.steps) == 4 for f in FUNNELS)


def _iso(at_us: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(at_us / US, timezone.utc).isoformat()


def _cli(filled: Filled, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    env.update(filled.settings.as_env(), COLUMNS="200", NO_COLOR="1")
    return CliRunner().invoke(app, ["funnels", *args], env=env)


def test_the_command_prints_each_funnel_as_a_table(filled):
    stuck = filled.truth.stuck
    done = _cli(filled, "--until", _iso(SIM_UNTIL), "--since", "1h", "--by", "app_version,platform")
    assert done.exit_code == 0, done.output
    out = done.stdout
    assert "checkout — From the cart to a confirmed order" in out and "onboarding" in out
    assert "app_version" in out and "drops most at" in out and "everyone" in out
    row = next(line for line in out.splitlines() if f" {stuck.app_version} " in line and f" {stuck.platform} " in line
               and "(−" in line and stuck.step in line.split("│")[-4])
    assert stuck.step in row
    as_json = _cli(filled, "--until", _iso(SIM_UNTIL), "--since", "1h", "--funnel", "checkout", "--json")
    assert as_json.exit_code == 0, as_json.output
    decoded = msgspec.json.decode(as_json.stdout)
    assert [f["funnel"] for f in decoded["funnels"]] == ["checkout"] and decoded["by"] == ["app_version"]


@pytest.mark.parametrize(("args", "words"), [
    (("--by", "country"), "--by 'country': unknown country"),
    (("--funnel", "refund"), "no funnel 'refund'"),
    (("--since", "forever"), "'forever' is not a duration"),
])
def test_command_line_mistakes_are_clear(filled, args, words):
    done = _cli(filled, *args)
    assert done.exit_code != 0
    assert isinstance(done.exception, UserError) and words in done.exception.message


def test_the_cli_reads_another_funnels_file(filled, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[[funnel]]\nname = 'pay'\nwindow = '10m'\nsteps = ['enter_payment', 'order_confirmed']\n")
    done = _cli(filled, "--until", _iso(SIM_UNTIL), "--since", "1h", "--file", str(path), "--json")
    assert done.exit_code == 0, done.output
    [only] = msgspec.json.decode(done.stdout)["funnels"]
    assert only["funnel"] == "pay" and only["window_s"] == 600 and only["total"]["now"]["entered"] > 0
    assert Path(path).exists()


def test_through_the_support_api_as_while_serve_holds_the_store(filled, tmp_path):
    """`supportlens serve` holds the embedded store: `supportlens funnels` asks its API, with the
    packaged funnels or the text of a --file of one's own."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from helpers import free_port
    from supportlens.gateway.server import open_site
    from supportlens.store.funnels import FUNNELS_PATH, funnel_report, load_funnels, parse_by
    from supportlens.store.lookup import LookupInputError
    from supportlens.support.access import DirectSupport, RemoteSupport
    from supportlens.support.api import build_support_app
    from test_gateway_http import serving

    port = free_port()

    async def main(stop: asyncio.Event) -> None:
        runner = await open_site(build_support_app(DirectSupport(filled.client), CollectorRegistry()), "127.0.0.1", port)
        await stop.wait()
        await runner.cleanup()

    since, until = SIM_UNTIL - 3600 * US, SIM_UNTIL
    packaged = FUNNELS_PATH.read_text(encoding="utf-8")
    mine = "[[funnel]]\nname = 'pay'\nwindow = '10m'\nsteps = ['enter_payment', 'order_confirmed']\n"
    with serving(main, port):
        remote = RemoteSupport(f"http://127.0.0.1:{port}")
        assert remote.funnel_report(packaged, "", since, until, "app_version,platform") == funnel_report(
            filled.client, load_funnels(), since, until, parse_by("app_version,platform"))
        [pay] = remote.funnel_report(mine, "", since, until, "platform").funnels
        assert pay.funnel == "pay" and pay.total.now.entered > 0
        with pytest.raises(LookupInputError, match="unknown country"):
            remote.funnel_report(packaged, "", since, until, "country")
