"""Drills: the pure transform (times shifted, pace, ids remapped consistently, marked, nothing else
changed); the reader of a recorded incident on real ClickHouse (exactly the records of the window,
each once, paged, also through the support API); and the real `supportlens drill` CLI replaying a
recorded incident from ClickHouse into real Kafka."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from conftest import subprocess_dsn
from helpers import free_port, settings_env, supportlens_cmd
from supportlens.span_batches import decode_spans, partition_of
from sinks.clickhouse_rows import MAPPINGS, RecordMeta, to_landing_json, to_row
from span_factory import client, server
from supportlens import store
from supportlens.config import Settings, load_settings
from supportlens.contracts import FaultReport, IncidentEvent, Network, Span, decode, encode
from supportlens.drill import Drill, DrillOptions, drill_report, drill_span, replay_window, run_drill
from supportlens.errors import UserError
from supportlens.gateway.addresses import ClientAddressPolicy
from supportlens.gateway.ingest import accept_fault_report
from supportlens.serve import READY_LINE
from supportlens.simulator.generate import Plan, Simulation
from supportlens.simulator.scenarios import scenario
from supportlens.simulator.world import build_world
from supportlens.store import recorded
from supportlens.store.lookup import LookupInputError
from supportlens.store.recorded import DRILL_ATTRIBUTE, RecordedIncident
from supportlens.support.access import DirectSupport, RemoteSupport
from supportlens.support.api import build_support_app
from supportlens.topic_reader import read_range
from supportlens.topics import provision

S = 1_000_000
T0 = 1_763_784_000_000_000
DRILL = Drill("ab12cd34", origin_us=T0 - 900 * S, start_us=1_800_000_000_000_000, speed=60)


# -- the transform (pure) -----------------------------------------------------------------


def test_ids_are_remapped_deterministically_within_128_printable_characters():
    assert DRILL.remap("r1") == "drill-ab12cd34-r1"
    assert DRILL.remap("") == ""  # no trace id stays no trace id
    long_a, long_b = "a" * 128, "a" * 127 + "b"
    assert len(DRILL.remap(long_a)) == 128 and DRILL.remap(long_a) == DRILL.remap(long_a)
    assert DRILL.remap(long_a) != DRILL.remap(long_b)  # the hash tells ids with one head apart
    assert DRILL.remap(long_a).startswith("drill-ab12cd34-aaa")
    assert all(0x21 <= ord(ch) <= 0x7E for ch in DRILL.remap(long_b))
    assert Drill("other", 0, 0, 0).remap("r1") != DRILL.remap("r1")  # two drills never share an id


def test_times_move_so_the_window_starts_at_the_drill_start_and_speed_sets_the_pace():
    assert DRILL.shift(DRILL.origin_us) == DRILL.start_us
    assert DRILL.shift(T0) - DRILL.shift(T0 - 30 * S) == 30 * S  # event time keeps the incident's pace
    assert DRILL.due_s(DRILL.origin_us) == 0.0
    assert DRILL.due_s(DRILL.origin_us + 600 * S) == pytest.approx(10.0)  # 60 recorded s per wall s
    fast = Drill("x", DRILL.origin_us, DRILL.start_us, speed=0)
    assert fast.due_s(DRILL.origin_us + 600 * S) == 0.0


def test_a_drilled_span_differs_only_in_ids_time_and_the_drill_mark():
    original = client(request_id="r1", trace_id="t1", network=Network(isp="China Mobile", asn=9808),
                      attributes={"screen": "cart", "retry": 2}, status="error", http_status=503)
    out = drill_span(original, DRILL)
    assert (out.request_id, out.trace_id) == ("drill-ab12cd34-r1", "drill-ab12cd34-t1")
    assert out.start_us == T0 - DRILL.origin_us + DRILL.start_us
    assert out.attributes == {"screen": "cart", "retry": 2, DRILL_ATTRIBUTE: True}
    unchanged = msgspec.structs.replace(out, request_id="r1", trace_id="t1", start_us=T0,
                                        attributes=original.attributes)
    assert unchanged == original
    assert decode(encode(out), Span) == out  # still a valid record


def test_a_drilled_report_keeps_its_links_to_its_requests_and_log():
    log = [client(request_id="r1", trace_id="t1", start_us=T0 - 5 * S),
           client(request_id="r0", span_id="c0", start_us=T0 - 60 * S)]
    report = FaultReport(report_id="rep-1", received_at_us=T0 + 20 * S, client_ip="203.0.113.7", user_id="u1",
                         request_ids=["r1", "r0"], client_log=log, user_message="付款一直失败",
                         attributes={"app": "shop"})
    out = drill_report(report, DRILL)
    spans = [drill_span(s, DRILL) for s in log]
    assert out.report_id == "drill-ab12cd34-rep-1"
    assert out.received_at_us == DRILL.shift(report.received_at_us)
    assert out.request_ids == [spans[0].request_id, spans[1].request_id]  # the same mapping as the spans'
    assert out.client_log == spans
    assert out.attributes == {"app": "shop", DRILL_ATTRIBUTE: True}
    unchanged = msgspec.structs.replace(out, report_id="rep-1", received_at_us=report.received_at_us,
                                        request_ids=report.request_ids, client_log=log, attributes=report.attributes)
    assert unchanged == report
    assert decode(encode(out), FaultReport) == out


def test_the_gateway_mark_on_an_attached_span_follows_its_report():
    attached = client(attributes={"attached_to_report": "rep-1"})
    assert drill_span(attached, DRILL).attributes["attached_to_report"] == DRILL.remap("rep-1")


def test_the_window_reaches_from_lead_before_the_start_to_tail_after_the_end():
    incident = RecordedIncident(incident_id="inc-1", state="resolved", title="", severity="sev3", root_key="service=payment",
                                started_at_us=T0, resolved_at_us=T0 + 600 * S, dimensions={}, drill=False)
    assert replay_window(incident, 900, 300, now_us=T0 + 10**9) == (T0 - 900 * S, T0 + 900 * S)
    still_open = msgspec.structs.replace(incident, resolved_at_us=None)
    assert replay_window(still_open, 900, 300, now_us=T0 + 60 * S) == (T0 - 900 * S, T0 + 360 * S)


# -- the reader, on real ClickHouse ---------------------------------------------------------


HOUR_US = 3_600 * S
RECENT = (time.time_ns() // 1000 // HOUR_US - 3) * HOUR_US  # within every table's retention
DURATION_S = 120


def _recorded_run(start_us: int = RECENT) -> tuple[list[Span], list[FaultReport], tuple[int, int]]:
    """A small simulated payment outage: its spans, its reports and its scenario window."""
    plan = Plan(scenario("service-outage"), rate=15, duration_s=DURATION_S, seed=11, start_us=start_us)
    sim = Simulation(plan, build_world(11, 300))
    spans, reports = [], []
    for tick in sim.ticks():
        for emit in tick.events:
            if emit.topic in ("client-spans", "server-spans"):
                spans.append(emit.record)
            elif emit.topic == "fault-reports":
                reports.append(emit.record)
    return spans, reports, plan.window_us


def _incident(incident_id: str, started_us: int, resolved_us: int | None, drill: bool = False) -> list[IncidentEvent]:
    base = dict(incident_id=incident_id, started_at_us=started_us, severity="sev2", reason="wide impact",
                root_key="service=payment", dimensions={"service": "payment"}, title="payment fails", drill=drill)
    events = [IncidentEvent(sequence=1, transition="declared", at_us=started_us + 5 * S, **base)]
    if resolved_us is not None:
        events.append(IncidentEvent(sequence=2, transition="resolved", at_us=resolved_us, resolved_at_us=resolved_us,
                                    **base))
    return events


def _as_stored(span: Span) -> Span:
    """What the spans table can give back: attribute values as text, no empty network."""
    text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in span.attributes.items()}
    network = span.network if span.network and span.network != Network() else None
    return msgspec.structs.replace(span, attributes=text, network=network)


def _land(db, topic: str, records) -> None:
    """Into the table as the sink puts them: landing JSON for spans, typed rows for the rest."""
    mapping = MAPPINGS[topic]
    if mapping.landing:
        lines = [to_landing_json(topic, encode(r), 1_048_576) for r in records]
        db.raw_insert(mapping.landing, insert_block=b"\n".join(lines), fmt="JSONEachRow")
    else:
        rows = [to_row(topic, encode(r), RecordMeta(0, i, 0), 1_048_576) for i, r in enumerate(records)]
        db.insert(mapping.table, rows, column_names=mapping.columns)


def _span_order(span: Span) -> tuple:
    return span.start_us, span.request_id, span.side, span.span_id, span.service


@pytest.fixture
def db(store_settings):
    db = store.connect(store_settings)
    store.migrate(db, store_settings)
    yield db
    db.command(f"DROP DATABASE IF EXISTS `{store_settings.clickhouse_database}`")


@pytest.fixture
def recorded_incident(db):
    """A recorded outage in the store, one report of it sent through the gateway (with its client log)."""
    spans, reports, (lo, hi) = _recorded_run()
    logged_span = client(request_id="r-logged", span_id="c-logged", trace_id="t-logged", start_us=lo + 40 * S,
                         status="error", http_status=503, client_ip="198.51.100.9", user_id="u-logged",
                         attributes={"screen": "checkout"})
    accepted = accept_fault_report(
        encode(FaultReport(report_id="rep-gw", received_at_us=0, client_ip="198.51.100.9", user_id="u-logged",
                           request_ids=["r-logged"], client_log=[logged_span], user_message="pay fails")),
        received_at_us=lo + 45 * S, client_ip="198.51.100.9", new_report_id=lambda: "unused",
        policy=ClientAddressPolicy(), max_bytes=1_048_576)
    stored_spans = spans + accepted.attached_spans
    _land(db, "client-spans", stored_spans)
    _land(db, "client-spans", stored_spans[:50])  # re-delivered: the same rows again
    _land(db, "fault-reports", reports + [accepted.report])
    drill_span_ = drill_span(spans[len(spans) // 2], Drill("old", 0, spans[len(spans) // 2].start_us, 0))
    _land(db, "client-spans", [drill_span_])  # an earlier drill inside the window: never replayed
    _land(db, "incidents", _incident("inc-pay", lo, hi))
    return stored_spans, reports + [accepted.report], accepted, (lo, hi)


def _all_spans(support, since, until, limit):
    out, after, pages = [], "", 0
    while True:
        page = support.recorded_spans(since, until, after, limit)
        out += page.spans
        pages += 1
        if not page.next:
            return out, pages
        after = page.next


def _all_reports(support, since, until, limit):
    out, after = [], ""
    while True:
        page = support.recorded_reports(since, until, after, limit)
        out += page.reports
        if not page.next:
            return out
        after = page.next


@pytest.mark.clickhouse
def test_the_reader_returns_exactly_the_records_of_the_window_each_once(db, recorded_incident):
    stored_spans, reports, accepted, (lo, hi) = recorded_incident
    support = DirectSupport(db)
    incident = support.recorded_incident("inc-pay")
    assert (incident.started_at_us, incident.resolved_at_us, incident.state) == (lo, hi, "resolved")
    assert incident.dimensions == {"service": "payment"} and not incident.drill
    since, until = replay_window(incident, 10, 10, now_us=0)

    expected = sorted((_as_stored(s) for s in stored_spans if since <= s.start_us < until), key=_span_order)
    got, pages = _all_spans(support, since, until, limit=97)
    assert pages > 3  # it really paged
    assert got == expected  # every field the table keeps, in start order, re-delivered copies once, no drill
    assert len(expected) < len(stored_spans)  # the window cut the run

    in_window = sorted((r for r in reports if since <= r.received_at_us < until), key=lambda r: (r.received_at_us, r.report_id))
    items = _all_reports(support, since, until, limit=3)
    assert [i.report.report_id for i in items] == [r.report_id for r in in_window]
    by_id = {i.report.report_id: i for i in items}
    assert by_id["rep-gw"].report == accepted.report  # through the gateway: the client log comes back whole
    for report in in_window:
        if report.report_id != "rep-gw":  # produced without the gateway: the log is lost, its length kept
            assert by_id[report.report_id].report == msgspec.structs.replace(report, client_log=[])
            assert by_id[report.report_id].client_log_spans == len(report.client_log)


@pytest.mark.clickhouse
def test_the_api_pages_the_same_records_and_refuses_bad_input(db, recorded_incident):
    _, _, _, (lo, hi) = recorded_incident
    direct = DirectSupport(db)

    async def scenario_() -> None:
        async with TestClient(TestServer(build_support_app(direct, CollectorRegistry()))) as http:
            answer = await http.get("/v1/incident", params={"id": "inc-pay"})
            incident = msgspec.json.decode(await answer.read(), type=RecordedIncident)
            assert incident == direct.recorded_incident("inc-pay")
            spans, after = [], ""
            while True:
                answer = await http.get("/v1/recorded/spans", params={"since_us": lo, "until_us": hi, "after": after,
                                                                       "limit": 250})
                page = msgspec.json.decode(await answer.read(), type=recorded.SpanPage)
                spans += page.spans
                if not page.next:
                    break
                after = page.next
            assert spans == _all_spans(direct, lo, hi, 10_000)[0]
            answer = await http.get("/v1/recorded/reports", params={"since_us": lo, "until_us": hi})
            page = msgspec.json.decode(await answer.read(), type=recorded.ReportPage)
            assert page.reports == _all_reports(direct, lo, hi, 200)
            for path, params, words in [
                ("/v1/incident", {"id": "inc-nope"}, "no incident 'inc-nope' is recorded"),
                ("/v1/incident", {"id": "x" * 500}, "is not a valid incident id"),
                ("/v1/recorded/spans", {"since_us": lo, "until_us": hi, "after": "bm90IGEgY3Vyc29y"}, "not a position"),
                ("/v1/recorded/spans", {"since_us": lo, "until_us": hi, "after": "'; DROP TABLE spans --"}, "not a position"),
                ("/v1/recorded/spans", {"since_us": hi, "until_us": lo}, "ends before it starts"),
                ("/v1/recorded/reports", {"since_us": "soon", "until_us": hi}, "must be a whole number"),
                ("/v1/recorded/spans", {"until_us": hi}, "give the window"),
                ("/v1/recorded/spans", {"since_us": lo, "until_us": hi, "limit": 10**6}, "out of range"),
            ]:
                answer = await http.get(path, params=params)
                body = await answer.json()
                assert answer.status == 400 and words in body["error"], (path, params, body)

    asyncio.run(scenario_())
    assert store.table_counts(db).rows["spans"] > 0  # the hostile `after` touched nothing


@pytest.mark.clickhouse
def test_drill_refuses_unknown_drill_and_empty_incidents_in_plain_words(db, recorded_incident, store_settings):
    support = DirectSupport(db)
    _land(db, "incidents", _incident("inc-empty", RECENT - 48 * HOUR_US, RECENT - 47 * HOUR_US))
    _land(db, "incidents", _incident("inc-drill", RECENT, RECENT + 60 * S, drill=True))
    for incident_id, words in [("inc-nope", "no incident 'inc-nope' is recorded"),
                               ("inc-empty", "nothing of inc-empty is recorded"),
                               ("inc-drill", "inc-drill is itself a drill")]:
        with pytest.raises(UserError, match=words):
            run_drill(store_settings, support, DrillOptions(incident_id, speed=0))
    unreachable = store_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    with pytest.raises(UserError, match="cannot reach Kafka"):
        run_drill(unreachable, support, DrillOptions("inc-pay", speed=0))
    with pytest.raises(LookupInputError):
        support.recorded_spans(0, 1, "garbage!", 10)


def test_drill_says_when_clickhouse_is_unreachable(tmp_path):
    env = {k: v for k, v in settings_env(load_settings(state_dir=tmp_path)).items()}
    env["SUPPORTLENS_CLICKHOUSE_DSN"] = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(supportlens_cmd("drill", "--incident", "inc-1"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: cannot use ClickHouse at http://127.0.0.1:" in done.stderr and "hint:" in done.stderr
    assert "Traceback" not in done.stderr


# -- the real CLI: recorded in ClickHouse, replayed into Kafka -----------------------------


def _start_serve(settings: Settings, log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    proc = subprocess.Popen(supportlens_cmd("serve", "--no-worker"), env=settings_env(settings), stdout=handle,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while READY_LINE.encode() not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return proc


def _drilled(settings: Settings, drill_id: str) -> dict[str, list]:
    """The records of one drill on the span and report topics, with their Kafka keys and timestamps."""
    out: dict[str, list] = {"client-spans": [], "server-spans": [], "fault-reports": []}
    for topic in out:
        kind = FaultReport if topic == "fault-reports" else Span
        for message in read_range(settings, [settings.topic(topic)]):
            # spans come in batch records: each span is listed with its record's key and timestamp
            records = [decode(message.value(), kind)] if kind is FaultReport else decode_spans(message.value()).spans
            for record in records:
                if record.attributes.get(DRILL_ATTRIBUTE) is True and \
                        (record.report_id if kind is FaultReport else record.request_id).startswith(f"drill-{drill_id}-"):
                    out[topic].append((message.key().decode(), message.timestamp()[1], record))
    return out


def _check_replay(drilled: dict[str, list], drill: Drill, spans: list[Span], reports: list[FaultReport],
                  window: tuple[int, int]) -> None:
    since, until = window
    want_spans = Counter((drill.remap(s.request_id), s.side, s.span_id, s.service) for s in spans
                         if since <= s.start_us < until)
    got_spans = Counter((r.request_id, r.side, r.span_id, r.service)
                        for topic in ("client-spans", "server-spans") for _, _, r in drilled[topic])
    assert got_spans == want_spans  # every span of the window once, none from outside
    assert all(r.side == "client" for _, _, r in drilled["client-spans"])
    by_new = {(drill.remap(s.request_id), s.side, s.span_id, s.service): s for s in spans}
    shifts = set()
    for topic in ("client-spans", "server-spans"):
        for key, ts_ms, span in drilled[topic]:
            original = by_new[(span.request_id, span.side, span.span_id, span.service)]
            # in a batch of its partition, stamped with the latest start of its recorded second
            assert partition_of(key.encode(), 3) == partition_of(span.request_id.encode(), 3)
            assert span.start_us // 1000 <= ts_ms < span.start_us // 1000 + 1000
            assert span.trace_id == drill.remap(original.trace_id)
            shifts.add(span.start_us - original.start_us)
            assert msgspec.structs.replace(span, request_id=original.request_id, trace_id=original.trace_id,
                                           start_us=original.start_us, attributes=original.attributes,
                                           network=original.network) == original
    want_reports = {drill.remap(r.report_id): r for r in reports if since <= r.received_at_us < until}
    assert sorted(r.report_id for _, _, r in drilled["fault-reports"]) == sorted(want_reports)
    for key, ts_ms, report in drilled["fault-reports"]:
        original = want_reports[report.report_id]
        assert key == report.report_id and ts_ms == report.received_at_us // 1000
        assert report.request_ids == [drill.remap(rid) for rid in original.request_ids]
        shifts.add(report.received_at_us - original.received_at_us)
    assert len(shifts) == 1  # one shift for every record: the window moved as a whole


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_cli_replays_a_recorded_incident_into_kafka_shifted_remapped_and_marked(kafka, clickhouse, tmp_path):
    settings = load_settings(
        kafka_bootstrap=kafka.bootstrap, topic_prefix=f"d{uuid.uuid4().hex[:8]}.", partitions=3,
        clickhouse_dsn=subprocess_dsn(clickhouse, tmp_path), clickhouse_database=f"t_{uuid.uuid4().hex[:10]}",
        state_dir=tmp_path / "state", sink_batch_rows=500, sink_flush_s=0.2, support_port=free_port(),
    )
    provision(settings)
    spans, reports, (lo, hi) = _recorded_run()
    producer = Producer(settings.producer_config())
    for span in spans:
        producer.produce(settings.topic(f"{span.side}-spans"), key=span.request_id, value=encode(span),
                         timestamp=span.start_us // 1000)
    for report in reports:
        producer.produce(settings.topic("fault-reports"), key=report.report_id, value=encode(report),
                         timestamp=report.received_at_us // 1000)
    for event in _incident("inc-pay", lo, hi):
        producer.produce(settings.topic("incidents"), key=event.incident_id, value=encode(event))
    assert producer.flush(30) == 0

    log = tmp_path / "serve.log"
    serve = _start_serve(settings, log)  # its sink records the incident in ClickHouse; its API serves the drill
    try:
        remote = RemoteSupport(settings.support_url)
        deadline = time.monotonic() + 120
        while (remote.table_counts().rows["spans"], remote.table_counts().rows["fault_reports"]) != (len(spans), len(reports)):
            assert time.monotonic() < deadline and serve.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        began = time.monotonic()
        done = subprocess.run(
            supportlens_cmd("drill", "--incident", "inc-pay", "--speed", "40", "--lead", "10s", "--tail", "10s",
                            "--drill-id", "t1"),
            env=settings_env(settings), capture_output=True, text=True, timeout=180)
        took = time.monotonic() - began
    finally:
        serve.terminate()
        serve.wait(60)
    assert done.returncode == 0, done.stderr + done.stdout
    print("\n" + done.stdout)
    assert "drill t1 of inc-pay" in done.stdout and "supportlens incidents" in done.stdout
    window = (lo - 10 * S, hi + 10 * S)
    assert took >= (window[1] - window[0]) / S / 40  # paced: 40 recorded seconds per wall second
    drilled = _drilled(settings, "t1")
    _check_replay(drilled, Drill("t1", window[0], 0, 40), spans, reports, window)
    replayed = sum(len(records) for records in drilled.values())
    assert f"{len(drilled['server-spans']):,}" in done.stdout and replayed > 100

    # with no serve running the CLI opens the store itself: the same replay, as fast as possible
    again = subprocess.run(
        supportlens_cmd("drill", "--incident", "inc-pay", "--speed", "0", "--lead", "10s", "--tail", "10s",
                        "--drill-id", "t2"),
        env=settings_env(settings), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr + again.stdout
    _check_replay(_drilled(settings, "t2"), Drill("t2", window[0], 0, 0), spans, reports, window)
