"""Misuse that fails elsewhere, on real Kafka with a real worker (issue #18): an integration reuses an
idempotency key with another body, its payment fails minutes later, and the report of that failure —
on its own "our payment service failed" — is told the misuse instead."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from helpers import WorkerProcess
from supportlens.config import Settings, load_settings
from supportlens.contracts import DiagnosedReport, FaultReport, MisuseDetection, Span, decode, encode
from supportlens.topic_reader import read_range
from supportlens.topics import provision

pytestmark = pytest.mark.kafka
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5"}
S = 1_000_000


def _settings(kafka) -> Settings:
    return load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"q{uuid.uuid4().hex[:8]}.", partitions=3)


def _request(request_id: str, operation: str, at_us: int, *, fail: bool = False, **attributes: str) -> list[Span]:
    """A client span and its entry hop (a failing payment behind it when ``fail``)."""
    who = dict(user_id="user-int-1", account_id="acct-int", request_id=request_id)
    client = Span(**who, span_id=f"c{request_id}", side="client", service="mobile-app", operation=operation,
                  start_us=at_us, duration_us=120_000, status="error" if fail else "ok",
                  http_status=502 if fail else 201, error_code="UPSTREAM_ERROR" if fail else "",
                  client_ip="203.0.113.7", attributes=attributes)
    entry = Span(**who, span_id=f"e{request_id}", parent_span_id=f"c{request_id}", side="server",
                 service="edge-gateway", operation=operation, start_us=at_us + 10_000, duration_us=100_000,
                 status="error" if fail else "ok", http_status=502 if fail else 201,
                 error_code="UPSTREAM_ERROR" if fail else "", attributes=attributes)
    if not fail:
        return [client, entry]
    payment = Span(**who, span_id=f"p{request_id}", parent_span_id=f"e{request_id}", side="server",
                   service="payment", operation="payment.checkout", start_us=at_us + 20_000, duration_us=80_000,
                   status="error", http_status=500, error_code="AMOUNT_MISMATCH")
    return [client, entry, payment]


def _send(settings: Settings, spans: list[Span], reports: list[FaultReport] = ()) -> None:
    producer = Producer(settings.producer_config())
    for span in spans:
        topic = settings.topic("client-spans" if span.side == "client" else "server-spans")
        producer.produce(topic, key=span.request_id.encode(), value=encode(span))
    for report in reports:
        producer.produce(settings.topic("fault-reports"), key=report.report_id.encode(), value=encode(report))
    assert producer.flush(30) == 0


def _read(settings: Settings, topic: str, kind):
    return [decode(m.value(), kind) for m in read_range(settings, [settings.topic(topic)])]


def _wait(what, timeout: float, worker: WorkerProcess):
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(worker.tail())
        time.sleep(0.5)


@pytest.mark.parametrize("report_first", [False, True], ids=["misuse-read-first", "report-read-first"])
def test_a_reused_idempotency_key_is_detected_and_names_the_later_payment_failure(kafka, tmp_path: Path,
                                                                                    report_first: bool):
    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    try:
        t0 = int((time.time() - 600) * S)
        orders = (_request("order-a", "POST /v1/orders", t0, idempotency_key="K-1", body_sha256="h1")
                  + _request("order-b", "POST /v1/orders", t0 + 9 * S, idempotency_key="K-1", body_sha256="h2"))
        failure = _request("pay-1", "POST /v1/payments/confirm", t0 + 90 * S, fail=True)
        report = FaultReport(report_id="rep-1", received_at_us=t0 + 120 * S, user_id="user-int-1",
                             account_id="acct-int", client_ip="203.0.113.7", locale="zh-CN",
                             request_ids=["pay-1", "order-b"], client_log=[failure[0]])
        # a record on user-steps that is no step is dead-lettered with its reason; the rest goes on
        producer = Producer(settings.producer_config())
        producer.produce(settings.topic("user-steps"), key=b"user-int-1", value=b'{"kind": "step", "name": 7}')
        assert producer.flush(30) == 0
        if report_first:
            # the report is diagnosed (as our payment's fault) before the orders are even sent:
            # the detection that comes later still explains it
            _send(settings, failure, [report])
            first = _wait(lambda: _read(settings, "reports-diagnosed", DiagnosedReport), 60, worker)
            assert [r.diagnosis.cls for r in first] == ["server_error"]
            _send(settings, orders)
        else:
            _send(settings, orders)
            _wait(lambda: _read(settings, "misuse-detections", MisuseDetection), 60, worker)
            _send(settings, failure, [report])

        [detection] = _wait(lambda: _read(settings, "misuse-detections", MisuseDetection), 60, worker)
        assert (detection.code, detection.request_id, detection.earlier_request_id, detection.account_id) == (
            "IDEMPOTENCY_KEY_REUSED", "order-b", "order-a", "acct-int")

        def traced() -> list[DiagnosedReport]:
            return [r for r in _read(settings, "reports-diagnosed", DiagnosedReport)
                    if r.diagnosis.misuse_detection_id]

        [told] = _wait(traced, 60, worker)
        d = told.diagnosis
        assert (told.report_id, d.cls, d.code, d.surfaced_as, d.service) == (
            "rep-1", "client_misuse", "IDEMPOTENCY_KEY_REUSED", "server_error", "payment")
        assert d.misuse_detection_id == detection.detection_id and "order-a" in d.evidence
        assert told.title == "幂等键被用于不同的订单"  # in the user's language
        # the traced version is the newest: it replaces the symptom's diagnosis downstream
        newest = max((r for r in _read(settings, "reports-diagnosed", DiagnosedReport) if r.report_id == "rep-1"),
                     key=lambda r: r.diagnosed_at_us)
        assert newest.diagnosis.misuse_detection_id == detection.detection_id
        [bad] = [m for m in read_range(settings, [settings.topic("dlq")])]
        headers = dict(bad.headers())
        assert headers["source_topic"] == settings.topic("user-steps").encode()
        assert headers["reason"] == b"field `name`: expected `str`, got `int`"
    finally:
        worker.stop()


def test_the_simulated_integrations_misuse_is_found_and_names_each_later_report(kafka, tmp_path: Path):
    """The simulator's ground truth: one standard account's integration reuses idempotency keys
    (supportlens/simulator/misuse.py); every reuse is detected as the order it labels, and every
    report of the payment failure that follows is traced to its own misuse, in the user's words."""
    from datetime import datetime, timedelta, timezone

    from sinks.run_summary import newest_diagnoses, score
    from supportlens.contracts import CorrelatedRequest
    from supportlens.simulator.labels import read_labels
    from supportlens.simulator.run import SimulateOptions, simulate
    from streams.catalog import load_catalog

    settings = _settings(kafka)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    try:
        start = datetime.now(timezone.utc) - timedelta(seconds=900)
        labels_path = tmp_path / "labels.jsonl"
        run = simulate(settings, SimulateOptions("quiet-night", rate=20, duration_s=400, seed=5, users=1500,
                                                 speed=0, start=start, labels_path=labels_path))
        truth = run.sequence_misuse
        assert truth is not None and len(truth.episodes) >= 3  # overlapping episodes of one user

        def traced() -> dict[str, DiagnosedReport]:
            newest = newest_diagnoses(_read(settings, "reports-diagnosed", DiagnosedReport))
            wanted = {e.report_id for e in truth.episodes}
            got = {rid: r for rid, r in newest.items() if rid in wanted and r.diagnosis.misuse_detection_id}
            return got if len(got) == len(wanted) else {}

        told = _wait(traced, 120, worker)
        detections = {d.request_id: d for d in _read(settings, "misuse-detections", MisuseDetection)}
        wording = load_catalog().codes[truth.code]
        for episode in truth.episodes:
            detection = detections[episode.misuse_request_id]
            assert (detection.earlier_request_id, detection.code, detection.account_id) == (
                episode.earlier_request_id, truth.code, truth.account_id)
            # the time of whichever span of the order was read first: the client's, or its entry hop's
            assert abs(detection.at_us - episode.misuse_at_us) < 1_000_000
            report = told[episode.report_id]
            assert report.diagnosis.misuse_detection_id == detection.detection_id, episode
            assert (report.diagnosis.cls, report.diagnosis.surfaced_as, report.diagnosis.service) == (
                "client_misuse", truth.surfaced_as, truth.surfaced_in)
            expected = wording.zh_cn if report.locale == "zh-CN" else wording.en
            assert report.title == expected.title
        # nothing else of the run is taken for this misuse: the rest of the traffic has no key
        assert set(detections) == {e.misuse_request_id for e in truth.episodes}
        # and the run's report diagnoses, newest first, count these as the misuse they are
        result = score(read_labels(labels_path), _read(settings, "requests", CorrelatedRequest),
                       _read(settings, "reports-diagnosed", DiagnosedReport))
        assert all(result.diagnosed[e.report_id].diagnosis.cls == "client_misuse" for e in truth.episodes)
    finally:
        worker.stop()
