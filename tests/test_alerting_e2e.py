"""Alerts travel the real path: supportlens /metrics → Prometheus (the repo's rules) →
Alertmanager (the repo's routes) → the receiver's webhook."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from helpers import WorkerProcess, free_port
from promstack import prom_stack  # noqa: F401 (a fixture)
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topics import provision

pytestmark = pytest.mark.promtool
# Short correlation timers so the worker diagnoses promptly, and a surge warm-up (default
# 900 s) well inside the five simulated minutes below, as in tests/test_incidents_kafka.py.
FAST = {
    "SUPPORTLENS_CORRELATION_GRACE_S": "2",
    "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5",
    "SUPPORTLENS_SURGE_WARMUP_S": "60",
}


def test_watchdog_reaches_receiver(prom_stack):  # noqa: F811
    stack = prom_stack()
    alert = stack.wait_for_alert("Watchdog", receiver="watchdog", timeout=30)
    assert alert.path == "/watchdog"
    assert alert.labels["severity"] == "none"
    assert alert.annotations["runbook_url"].endswith("runbooks.md#watchdog")


@pytest.mark.kafka
def test_outage_alert_reaches_webhook(settings, tmp_path, prom_stack):  # noqa: F811
    provision(settings)
    port = free_port()
    worker = WorkerProcess(
        settings, tmp_path / "worker.log", SUPPORTLENS_WORKER_METRICS_PORT=str(port), **FAST
    ).wait_ready()
    try:
        stack = prom_stack(targets={"supportlens-worker": [f"127.0.0.1:{port}"]})
        # Event times end now, so the incident's start is recent; the outage (60–210 s) plus
        # the policy's 120 s resolve cooldown outlasts the run, so the incident stays open.
        simulate(settings, SimulateOptions(
            "service-outage", rate=50, duration_s=300, speed=0,
            start=datetime.now(timezone.utc) - timedelta(seconds=300), labels_path=tmp_path / "labels.jsonl",
        ))
        try:
            # the root the incident names: the payment service. The failure class may surge a
            # bucket earlier and be the root at the declaration; the service then refines it.
            alert = stack.wait_for_alert("IncidentOpen", {"root_key": "service=payment"}, receiver="incidents",
                                         timeout=180)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{worker.tail()}") from None
    finally:
        worker.stop()

    assert alert.path == "/incidents"
    assert alert.labels["severity"] == "critical"
    assert alert.labels["drill"] == "false"
    assert alert.labels["job"] == "supportlens-worker"
    assert alert.labels["incident_id"]
    assert alert.labels["incident_severity"]
    assert alert.labels["incident_id"] in alert.annotations["summary"]
    assert alert.annotations["runbook_url"].endswith("runbooks.md#incidentopen")
