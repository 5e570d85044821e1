"""The worker on real Kafka: every simulated request correlated, reports diagnosed, bad input dead-lettered,
and a worker killed mid-run loses nothing."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Producer

from helpers import WorkerProcess, settings_env, supportlens_cmd
from sinks.run_summary import accuracy_by_class, observable_requests, score
from supportlens.config import Settings, load_settings
from supportlens.contracts import CorrelatedRequest, DiagnosedReport, decode
from supportlens.simulator.labels import ReportLabel, read_labels, read_run
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topic_reader import read_range
from supportlens.topics import provision

pytestmark = pytest.mark.kafka
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5",
        "SUPPORTLENS_WORKER_SESSION_TIMEOUT_S": "8"}  # a killed worker's partitions move on in 8 s, not 60
SCENARIOS = ("service-outage", "isp-outage", "bad-release", "misuse-wave", "quiet-night")


def _settings(kafka) -> Settings:
    return load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"w{uuid.uuid4().hex[:8]}.", partitions=3)


def _outputs(settings: Settings) -> tuple[dict[str, list[bytes]], list[DiagnosedReport]]:
    requests: dict[str, list[bytes]] = defaultdict(list)
    for message in read_range(settings, [settings.topic("requests")]):
        requests[message.key().decode()].append(message.value())
    reports = [decode(m.value(), DiagnosedReport) for m in read_range(settings, [settings.topic("reports-diagnosed")])]
    return requests, reports


def _wait_for(settings: Settings, requests: int, reports: int, worker: WorkerProcess, timeout: float = 120):
    """Outputs once every expected request and report is there *and* nothing new came for a
    while: a busy worker may still be sending a later version of a request that already appeared."""
    quiet_s = 4.0  # > settle + grace + a timer tick of FAST
    deadline = time.monotonic() + timeout
    last_total, last_change = -1, time.monotonic()
    while True:
        seen, diagnosed = _outputs(settings)
        total = sum(len(copies) for copies in seen.values()) + len(diagnosed)
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        complete = len(seen) >= requests and len({r.report_id for r in diagnosed}) >= reports
        if complete and time.monotonic() - last_change >= quiet_s:
            return seen, diagnosed
        # past the deadline only while the worker still makes progress: a loaded machine (CI
        # beside other work) slows it down, a lost request stops the count for good
        stalled = time.monotonic() - last_change > 30
        if time.monotonic() > deadline and (stalled or time.monotonic() > deadline + 4 * timeout):
            raise AssertionError(f"{len(seen)}/{requests} requests, {len(diagnosed)}/{reports} reports:\n{worker.tail()}")
        time.sleep(0.5)


def _decoded(settings: Settings) -> tuple[list[CorrelatedRequest], list[DiagnosedReport]]:
    seen, diagnosed = _outputs(settings)
    return [decode(c, CorrelatedRequest) for copies in seen.values() for c in copies], diagnosed


def test_every_scenario_is_correlated_completely_and_reports_diagnosed_as_labelled(kafka, tmp_path):
    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    try:
        labels = []
        for seed, name in enumerate(SCENARIOS):
            path = tmp_path / f"{name}.jsonl"
            simulate(settings, SimulateOptions(name, 100, 40, seed=seed, speed=0, labels_path=path))
            labels.extend(read_labels(path))
        expected = observable_requests(labels)
        _wait_for(settings, len(expected), sum(isinstance(l, ReportLabel) for l in labels), worker)
        result = score(labels, *_decoded(settings))
    finally:
        worker.stop()

    assert result.requests_complete and result.unexpected == 0  # every observable request, nothing else
    assert result.reports_complete
    print("\nrequests (expected, diagnosed):", dict(sorted(result.requests.items())), "unobservable:", result.unobservable)
    print("reports  (expected, diagnosed):", dict(sorted(result.reports.items())))
    for confusion in (result.requests, result.reports):
        for cls, (right, total) in accuracy_by_class(confusion).items():
            assert right / total >= 0.95, f"{cls}: {right}/{total} right; {dict(confusion)}"
    assert {r.locale for r in result.diagnosed.values()} == {"en", "zh-CN"}


def test_bad_records_go_to_the_dead_letter_topic_and_the_worker_goes_on(kafka, tmp_path):
    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    good = b'{"request_id":"ok-1","side":"client","service":"app","start_us":1,"duration_us":5,"status":"ok"}'
    bad = [
        ("client-spans", b"r-1", b"{nope", "not valid JSON"),
        ("server-spans", b"r-2", b'{"side":"server","service":"api","start_us":1,"duration_us":1,"status":"ok"}',
         "missing required field `request_id`"),
        ("server-spans", b"someone-else",
         b'{"request_id":"r-3","side":"server","service":"api","start_us":1,"duration_us":1,"status":"ok"}',
         "spans must be keyed by request id"),
        ("fault-reports", b"rep-1", b'{"report_id":"rep-1","received_at_us":"soon","client_ip":"1.2.3.4"}',
         "field `received_at_us`: expected `int`, got `str`"),
    ]
    # A request seen only from the server, whose partition's client stream then carries nothing
    # but a bad record: it must still be emitted when that stream falls silent.
    server_only = b'{"request_id":"r-1","side":"server","service":"api","start_us":1,"duration_us":1,"status":"ok"}'
    try:
        producer = Producer(settings.producer_config())
        producer.produce(settings.topic("client-spans"), key=b"ok-1", value=good)
        producer.produce(settings.topic("server-spans"), key=b"r-1", value=server_only)
        for topic, key, value, _ in bad:  # the bad client record comes last in its partition
            producer.produce(settings.topic(topic), key=key, value=value)
        assert producer.flush(30) == 0
        seen, _ = _wait_for(settings, 2, 0, worker)
        deadline = time.monotonic() + 30
        while len(dead := list(read_range(settings, [settings.topic("dlq")]))) < len(bad):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.5)
        assert worker.proc.poll() is None  # still running
    finally:
        worker.stop()
    assert set(seen) == {"ok-1", "r-1"}
    by_value = {m.value(): dict(m.headers()) for m in dead}
    for topic, key, value, reason in bad:
        header = by_value[value]
        assert reason in header["reason"].decode()
        assert header["source_topic"].decode() == settings.topic(topic)
        assert int(header["source_partition"]) >= 0 and int(header["source_offset"]) >= 0


@pytest.mark.chaos
def test_a_worker_killed_mid_run_loses_no_request_and_repeats_none_with_other_content(kafka, tmp_path):
    settings = _settings(kafka)
    provision(settings)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log, **FAST).wait_ready()
    labels = tmp_path / "outage.jsonl"
    run = subprocess.Popen(
        supportlens_cmd("simulate", "--scenario", "service-outage", "--rate", "100", "--duration", "40",
                        "--speed", "5", "--labels", str(labels)),
        env=settings_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(4)  # mid-run: spans in flight, requests pending in the table
    worker.kill()
    worker = WorkerProcess(settings, log, **FAST).wait_ready()
    try:
        assert run.wait(120) == 0, run.stderr.read().decode() if run.stderr else ""
        summary = read_run(labels)
        truth = set(observable_requests(read_labels(labels)))
        seen, diagnosed = _wait_for(settings, len(truth), summary.counts["fault-reports"], worker)
    finally:
        worker.stop()
    assert set(seen) == truth
    for request_id, copies in seen.items():
        by_version: dict[int, set[bytes]] = defaultdict(set)
        for copy in copies:
            by_version[decode(copy, CorrelatedRequest).version].add(copy)
        assert all(len(contents) == 1 for contents in by_version.values()), request_id
    assert {r.report_id for r in diagnosed} == {l.report_id for l in read_labels(labels) if isinstance(l, ReportLabel)}
