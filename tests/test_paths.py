"""What users did before they complained (issue #18): a report's path and the common paths
into reports, on real ClickHouse filled from a simulation, against what the simulation emitted."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from rich.console import Console

from helpers import insert_records, own_database
from supportlens.contracts import BehaviourEvent, DiagnosedReport, FaultReport, Span
from supportlens.simulator.generate import Plan, Simulation
from supportlens.simulator.scenarios import scenario
from supportlens.simulator.world import build_world
from supportlens.store.lookup import LookupInputError, report_detail
from supportlens.store.paths import BEFORE_S, WITHDRAWN, common_paths, path_before, step_name, summary
from supportlens.support.render import paths_table, report_view
from streams.catalog import load_catalog
from streams.correlate import add_span, build_request
from streams.diagnose import diagnose_report, primary_request_id

pytestmark = pytest.mark.clickhouse
US = 1_000_000
CATALOG = load_catalog()


@dataclass
class Filled:
    client: Any
    since_us: int
    until_us: int
    behaviour: list[BehaviourEvent]
    diagnoses: list[DiagnosedReport]

    def truth_before(self, user_id: str, until_us: int) -> list[str]:
        if any(b.user_id == user_id and b.name == WITHDRAWN for b in self.behaviour):
            return []  # withdrew consent (the simulator has some who do): in no path
        return [step_name(b.screen, b.name) for b in sorted(self.behaviour, key=lambda b: b.ts_us)
                if b.user_id == user_id and until_us - BEFORE_S * US <= b.ts_us <= until_us and b.name != WITHDRAWN]


@pytest.fixture(scope="module")
def filled(clickhouse_target, tmp_path_factory) -> Iterator[Filled]:
    day = datetime.now(timezone.utc).date() - timedelta(days=1)
    start = int(datetime(day.year, day.month, day.day, 8, tzinfo=timezone.utc).timestamp()) * US
    world = build_world(5, 2000)
    settings, client = own_database(clickhouse_target.dsn, tmp_path_factory.mktemp("paths-state"))
    behaviour, diagnoses = [], []
    for name, at in (("normal", start), ("misuse-wave", start + 600 * US)):
        records = [e.record for tick in Simulation(Plan(scenario(name), 60, 600, 5, at), world).ticks()
                   for e in tick.events]
        pending: dict[str, Any] = {}
        for record in records:
            if isinstance(record, Span):
                pending[record.request_id], _ = add_span(pending.get(record.request_id), record, 0.0)
        requests = {rid: build_request(rid, state, CATALOG) for rid, state in pending.items()}
        reports = [r for r in records if isinstance(r, FaultReport)]
        diagnosed = [diagnose_report(r, requests.get(primary_request_id(r)), CATALOG, r.received_at_us + US)
                     for r in reports]
        events = [r for r in records if isinstance(r, BehaviourEvent)]
        insert_records(client, "requests", list(requests.values()))
        insert_records(client, "fault-reports", reports)
        insert_records(client, "reports-diagnosed", diagnosed)
        insert_records(client, "behaviour", events)
        behaviour += events
        diagnoses += diagnosed
    yield Filled(client, start, start + 1200 * US, behaviour, diagnoses)
    client.command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")


def test_a_reports_path_is_the_users_consented_behaviour_and_requests_before_it(filled):
    with_path = [d for d in filled.diagnoses if filled.truth_before(d.user_id, d.received_at_us)]
    assert len(with_path) >= 5, "the simulation gives reports with behaviour before them"
    for d in with_path[:10]:
        steps = path_before(filled.client, d.user_id, d.received_at_us)
        assert [s.what for s in steps if s.kind == "behaviour"] == filled.truth_before(d.user_id, d.received_at_us)
        assert [s.at_us for s in steps] == sorted(s.at_us for s in steps)
        assert all(d.received_at_us - BEFORE_S * US <= s.at_us <= d.received_at_us for s in steps)
        cited = [s for s in steps if s.kind == "request"]
        assert cited, "the user's requests of the window are in the path too"
    without = [d for d in filled.diagnoses if d.user_id and not filled.truth_before(d.user_id, d.received_at_us)]
    assert without and all(path_before(filled.client, d.user_id, d.received_at_us) == [] for d in without[:5])


def test_lookup_report_shows_what_the_user_did_before(filled):
    d = next(d for d in filled.diagnoses if filled.truth_before(d.user_id, d.received_at_us))
    detail = report_detail(filled.client, d.report_id)
    assert detail.path and summary(detail.path) in _text(report_view(detail))
    last = filled.truth_before(d.user_id, d.received_at_us)[-1]
    assert last in summary(detail.path)


def test_the_common_paths_into_reports_per_class_are_the_simulations(filled):
    found = common_paths(filled.client, filled.since_us, filled.until_us, steps=3)
    truth: dict[str, Counter[tuple[str, ...]]] = defaultdict(Counter)
    for d in filled.diagnoses:
        before = filled.truth_before(d.user_id, d.received_at_us) if d.user_id else []
        if before:
            truth[d.diagnosis.cls][tuple(before[-3:])] += 1
    assert found.paths and {p.diagnosis_class for p in found.paths} == set(truth)
    for cls, counts in truth.items():
        rows = [p for p in found.paths if p.diagnosis_class == cls]
        assert {tuple(p.path): p.reports for p in rows} == {path: counts[path] for path in map(lambda p: tuple(p.path), rows)}
        shown = {tuple(p.path) for p in rows}
        assert min(p.reports for p in rows) >= max((n for path, n in counts.items() if path not in shown), default=0)
        assert sum(p.share for p in rows) <= 1.0 + 1e-9
    misuse = [p for p in found.paths if p.diagnosis_class == "client_misuse"]
    assert misuse, "the misuse wave's reports have paths"
    everyone = Counter(d.diagnosis.cls for d in filled.diagnoses)
    for cls, left in found.without_path.items():
        assert left == everyone[cls] - sum(truth[cls].values())
    assert "paths into fault reports" in _text(paths_table(found))


def test_a_user_who_withdrew_consent_is_in_no_path_and_no_count(filled):
    before = common_paths(filled.client, filled.since_us, filled.until_us, steps=3)
    d = next(d for d in filled.diagnoses if d.diagnosis.cls == "client_misuse"
             and filled.truth_before(d.user_id, d.received_at_us))
    mine = sum(1 for r in filled.diagnoses if r.user_id == d.user_id
               and filled.truth_before(r.user_id, r.received_at_us))
    withdrawal = BehaviourEvent(event_id=f"w-{uuid.uuid4().hex[:8]}", user_id=d.user_id, ts_us=filled.until_us,
                                name=WITHDRAWN)
    insert_records(filled.client, "behaviour", [withdrawal])
    try:
        assert path_before(filled.client, d.user_id, d.received_at_us) == []
        assert report_detail(filled.client, d.report_id).path == []
        after = common_paths(filled.client, filled.since_us, filled.until_us, steps=3)
        # each of their reports that had a path stands among those without one now
        assert sum(after.without_path.values()) - sum(before.without_path.values()) == mine > 0
    finally:
        filled.client.command(f"ALTER TABLE behaviour DELETE WHERE event_id = '{withdrawal.event_id}'",
                              settings={"mutations_sync": 2})


def test_steps_out_of_range_are_a_clear_error(filled):
    with pytest.raises(LookupInputError, match="--steps must be from 1 to 10"):
        common_paths(filled.client, filled.since_us, filled.until_us, steps=0)


def _text(renderable: Any) -> str:
    console = Console(record=True, width=300)
    console.print(renderable)
    return " ".join(console.export_text().split())


def test_through_the_support_api_as_while_serve_holds_the_store(filled):
    import asyncio

    from prometheus_client import CollectorRegistry

    from helpers import free_port
    from supportlens.gateway.server import open_site
    from supportlens.support.access import DirectSupport, RemoteSupport
    from supportlens.support.api import build_support_app
    from test_gateway_http import serving

    port = free_port()

    async def main(stop: asyncio.Event) -> None:
        runner = await open_site(build_support_app(DirectSupport(filled.client), CollectorRegistry()), "127.0.0.1", port)
        await stop.wait()
        await runner.cleanup()

    with serving(main, port):
        remote = RemoteSupport(f"http://127.0.0.1:{port}")
        assert remote.common_paths(filled.since_us, filled.until_us, 2) == common_paths(
            filled.client, filled.since_us, filled.until_us, steps=2)
        d = next(d for d in filled.diagnoses if filled.truth_before(d.user_id, d.received_at_us))
        assert remote.report_detail(d.report_id).path == report_detail(filled.client, d.report_id).path != []
        with pytest.raises(LookupInputError, match="--steps must be from 1 to 10"):
            remote.common_paths(filled.since_us, filled.until_us, 11)
