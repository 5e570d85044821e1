"""The ClickHouse sink on real Kafka and real ClickHouse, behind a real worker.

A simulated run lands in every table exactly as often as it happened; a sink killed with
SIGKILL mid-run and restarted leaves no row missing and none twice. ClickHouse refusing
inserts is in ``test_chaos.py``.
"""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from conftest import subprocess_dsn
from helpers import WorkerProcess, free_port, settings_env, supportlens_cmd
from sinks.clickhouse_sink import ClickHouseSink
from sinks.run_summary import observable_requests
from supportlens import store
from supportlens.config import Settings, load_settings
from supportlens.contracts import DiagnosedReport, Diagnosis, MisuseDetection, encode
from supportlens.metrics import Metrics
from supportlens.serve import READY_LINE
from supportlens.simulator.labels import ReportLabel, RequestLabel, read_labels, read_run
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.span_batches import partition_of
from supportlens.store import lookup
from supportlens.support.access import RemoteSupport
from supportlens.topic_reader import read_range
from supportlens.topics import provision

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5"}
BAD = [  # (topic, value): each must become one dead letter
    ("client-spans", b"{not json"),
    ("fault-reports", b'{"report_id":"rep-x","received_at_us":"soon","client_ip":"1.2.3.4"}'),
    ("behaviour", b'{"event_id":"e","user_id":"u","ts_us":1,"name":""}'),
]


def _bad_batch(partitions: int) -> tuple[int, bytes]:
    """A batch record (for its partition) of two good client spans with two bad ones between:
    each bad span is one dead letter of its own, the good ones are stored and correlated."""
    ids = [f"batch-{i}" for i in range(200)]
    home = partition_of(ids[0].encode(), partitions)
    good = [i for i in ids if partition_of(i.encode(), partitions) == home][:2]
    span = lambda rid: (b'{"request_id":"%s","side":"client","service":"app","start_us":%d,"duration_us":5,'  # noqa: E731
                        b'"status":"ok"}' % (rid.encode(), time.time_ns() // 1000))
    return home, b"[" + b",".join([span(good[0]), b'{"request_id":7}', span(good[1]), b'"junk"']) + b"]"


BATCH_GOOD, BATCH_BAD = 2, 2


def _settings(kafka, dsn: str, **extra) -> Settings:
    return load_settings(
        kafka_bootstrap=kafka.bootstrap, topic_prefix=f"s{uuid.uuid4().hex[:8]}.", partitions=3,
        clickhouse_dsn=dsn, clickhouse_database=f"t_{uuid.uuid4().hex[:10]}",
        sink_batch_rows=500, sink_flush_s=0.2, sink_session_timeout_s=8, **extra,
    )


def _expected(labels_path: Path, dead_letters: int) -> dict[str, int]:
    labels = list(read_labels(labels_path))
    run = read_run(labels_path)
    return {
        "spans": run.counts.get("client-spans", 0) + run.counts.get("server-spans", 0) + BATCH_GOOD,
        "requests": len(observable_requests(labels)) + BATCH_GOOD,
        "fault_reports": run.counts.get("fault-reports", 0),
        "report_diagnoses": sum(isinstance(label, ReportLabel) for label in labels),
        "behaviour": run.counts.get("behaviour", 0),
        "dead_letters": dead_letters,
    }


def _distinct_requests(settings: Settings, at_least: int) -> int:
    """Distinct request ids on the requests topic, once the worker has written about as many as expected
    and nothing new came for a while."""
    last, since = -1, time.monotonic()
    deadline = since + 120
    while time.monotonic() < deadline:
        count = len({m.key() for m in read_range(settings, [settings.topic("requests")])})
        if count != last:
            last, since = count, time.monotonic()
        elif count >= at_least and time.monotonic() - since > 5:
            return count
        time.sleep(1.0)
    raise AssertionError(f"the worker wrote {last} requests, expected about {at_least}")


def _on_topics(settings: Settings) -> str:
    """What the worker wrote, to tell a sink's miss from a worker's."""
    keys = {m.key() for m in read_range(settings, [settings.topic("requests")])}
    return f"distinct requests on {settings.topic('requests')}: {len(keys)}"


def _produce_bad(settings: Settings) -> None:
    producer = Producer(settings.producer_config())
    for topic, value in BAD:
        producer.produce(settings.topic(topic), key=b"bad", value=value)
    partition, batch = _bad_batch(settings.partitions)
    producer.produce(settings.topic("client-spans"), key=b"bad-batch", value=batch, partition=partition)
    assert producer.flush(30) == 0


def _wait_for_counts(counts, expected: dict[str, int], timeout: float, why) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        rows = {table: counts().rows[table] for table in expected}
        if rows == expected:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"tables {rows} != expected {expected}\n{why()}")
        time.sleep(1.0)


def test_a_simulated_run_lands_in_every_table_once(kafka, clickhouse, tmp_path):
    settings = _settings(kafka, clickhouse.dsn)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    labels_path = tmp_path / "outage.jsonl"
    client = store.connect(settings)
    store.migrate(client, settings)
    stop = threading.Event()
    sink = ClickHouseSink(settings, store.connect(settings), Metrics(CollectorRegistry()), stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        simulate(settings, SimulateOptions("service-outage", 100, 40, seed=3, speed=0, labels_path=labels_path))
        _produce_bad(settings)
        expected = _expected(labels_path, dead_letters=len(BAD) + BATCH_BAD)
        rows = _wait_for_counts(lambda: store.table_counts(client), expected, 180,
                                lambda: _on_topics(settings) + "\n" + worker.tail())
    finally:
        stop.set()
        thread.join(30)
        worker.stop()
    print("\nrows per table:", rows)

    # the trends count every request once, in the class the worker gave it
    trend_total = client.query("SELECT uniqMerge(requests) FROM problem_trends").result_rows[0][0]
    assert trend_total == expected["requests"]
    reasons = dict(client.query("SELECT source_topic, reason FROM dead_letters FINAL WHERE key = 'bad'").result_rows)
    assert "not valid JSON" in reasons[settings.topic("client-spans")]
    assert "received_at_us" in reasons[settings.topic("fault-reports")]
    assert "name" in reasons[settings.topic("behaviour")]
    # the batch's two bad spans are a dead letter each, named by position; the value is the span alone
    batch_letters = client.query("SELECT source_position, reason, value FROM dead_letters FINAL "
                                 "WHERE key = 'bad-batch' ORDER BY source_position").result_rows
    assert [(p, r.split(":")[0], v) for p, r, v in batch_letters] == [
        (1, "span [1] of the batch", '{"request_id":7}'), (3, "span [3] of the batch", '"junk"')]

    # support finds the outage: a reporter's timeline, and the failing service on top
    labels = list(read_labels(labels_path))
    failing, _ = Counter(label.failing_service for label in labels if isinstance(label, RequestLabel)
                         and label.in_scenario_window and label.expected_class == "server_error").most_common(1)[0]
    report = next(label for label in labels if isinstance(label, ReportLabel) and label.expected_class == "server_error")
    now = time.time_ns() // 1000
    story = lookup.timeline(client, "user", report.user_id, now - 86_400_000_000, now + 3_600_000_000)
    kinds = {(entry.kind, entry.id): entry for entry in story.entries}
    assert kinds[("report", report.report_id)].diagnosis_class == "server_error"
    assert kinds[("request", report.request_ids[0])].service == failing
    top = lookup.top_problems(client, "service", now - 86_400_000_000, now + 3_600_000_000)
    assert (top.rows[0].diagnosis_class, top.rows[0].value) == ("server_error", failing)


def test_misuse_detections_land_and_a_traced_diagnosis_replaces_the_symptom(kafka, clickhouse):
    """The sink reads misuse-detections: a detection written twice is one row, a bad one a dead
    letter; the traced re-emission of a report wins over its first diagnosis, whatever came first."""
    settings = _settings(kafka, clickhouse.dsn)
    provision(settings)
    client = store.connect(settings)
    store.migrate(client, settings)
    now = time.time_ns() // 1000
    detection = MisuseDetection(
        detection_id="idempotency-key-reuse:r-order-2", rule="idempotency-key-reuse", code="IDEMPOTENCY_KEY_REUSED",
        user_id="u1", account_id="acct-1", at_us=now - 300_000_000, request_id="r-order-2",
        earlier_request_id="r-order-1", evidence="POST /v1/orders reused the idempotency_key of request r-order-1")
    untraced = DiagnosedReport(report_id="rep-1", received_at_us=now, diagnosed_at_us=now + 1_000_000, user_id="u1",
                               client_ip="203.0.113.7", diagnosis=Diagnosis(cls="server_error", service="payment"))
    traced = msgspec.structs.replace(untraced, diagnosed_at_us=now + 9_000_000, diagnosis=Diagnosis(
        cls="client_misuse", service="payment", code=detection.code, surfaced_as="server_error",
        misuse_detection_id=detection.detection_id))
    # a second report: its traced version is read before the untraced one (another partition, a late re-delivery)
    other = msgspec.structs.replace(untraced, report_id="rep-2")
    producer = Producer(settings.producer_config())
    for topic, key, record in [("misuse-detections", b"u1", detection), ("reports-diagnosed", b"rep-1", untraced),
                               ("reports-diagnosed", b"rep-1", traced), ("misuse-detections", b"u1", detection),
                               ("reports-diagnosed", b"rep-2", msgspec.structs.replace(traced, report_id="rep-2")),
                               ("reports-diagnosed", b"rep-2", other)]:
        producer.produce(settings.topic(topic), key=key, value=encode(record))
    producer.produce(settings.topic("misuse-detections"), key=b"bad", value=b'{"detection_id":"d","rule":"r"}')
    assert producer.flush(30) == 0
    stop = threading.Event()
    sink = ClickHouseSink(settings, store.connect(settings), Metrics(CollectorRegistry()), stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        _wait_for_counts(lambda: store.table_counts(client),
                         {"misuse_detections": 1, "report_diagnoses": 2, "dead_letters": 1}, 60, lambda: "")
    finally:
        stop.set()
        thread.join(30)
    stored = client.query("SELECT detection_id, code, user_id, account_id, request_id, earlier_request_id "
                          "FROM misuse_detections FINAL").result_rows
    assert stored == [(detection.detection_id, detection.code, "u1", "acct-1", "r-order-2", "r-order-1")]
    diagnoses = client.query("SELECT report_id, diagnosis_class, diagnosis_surfaced_as, misuse_detection_id "
                             "FROM report_diagnoses FINAL ORDER BY report_id").result_rows
    assert diagnoses == [(r, "client_misuse", "server_error", detection.detection_id) for r in ("rep-1", "rep-2")]
    [(source, reason)] = client.query("SELECT source_topic, reason FROM dead_letters FINAL").result_rows
    assert source == settings.topic("misuse-detections") and "code" in reason
    report = lookup.report_detail(client, "rep-1")
    assert report.misuse is not None and (report.misuse.code, report.surfaced_as) == (detection.code, "server_error")
    client.command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")


def _start_serve(settings: Settings, log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    proc = subprocess.Popen(supportlens_cmd("serve", "--no-worker"), env=settings_env(settings),
                            stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while READY_LINE.encode() not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return proc


@pytest.mark.chaos
def test_a_sink_killed_mid_run_and_restarted_leaves_no_row_missing_or_twice(kafka, clickhouse, tmp_path):
    settings = _settings(kafka, subprocess_dsn(clickhouse, tmp_path), support_port=free_port())
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    labels_path = tmp_path / "outage.jsonl"
    log = tmp_path / "serve.log"
    run = subprocess.Popen(
        supportlens_cmd("simulate", "--scenario", "service-outage", "--rate", "100", "--duration", "40",
                        "--speed", "4", "--labels", str(labels_path)),
        env=settings_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    remote = RemoteSupport(settings.support_url)
    serve = _start_serve(settings, log)
    try:
        deadline = time.monotonic() + 60
        while remote.table_counts().rows["spans"] < 1500:  # mid-run: some batches in, more on the way
            assert time.monotonic() < deadline and serve.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        serve.kill()
        serve.wait()
        assert run.poll() is None, "the run ended before the kill; make it longer"
        serve = _start_serve(settings, log)
        assert run.wait(120) == 0, run.stderr.read().decode()
        _produce_bad(settings)
        expected = _expected(labels_path, dead_letters=len(BAD) + BATCH_BAD)
        # the worker wrote every request (a miss here is the worker's, not the sink's)
        assert _distinct_requests(settings, at_least=expected["requests"]) == expected["requests"]
        _wait_for_counts(remote.table_counts, expected, 180, lambda: _on_topics(settings) + "\n" + log.read_text()[-4000:])
    finally:
        serve.terminate()
        serve.wait(60)
        worker.stop()
    # After a clean stop the store is free: read it as a person would, through the CLI.
    status = subprocess.run(supportlens_cmd("db", "status", "--json"), env=settings_env(settings),
                            capture_output=True, check=True)
    counts = msgspec.json.decode(status.stdout, type=store.TableCounts)
    assert {table: counts.rows[table] for table in expected} == expected
    print("\nrows:", counts.rows, "\nstored (re-delivered copies before merges):", counts.stored)
