"""Prometheus rules pass promtool's checks and unit tests; every alert has its severity,
annotations, runbook section and unit test; Alertmanager's config is valid and routes
each kind of alert to its receiver."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from promstack import ALERTMANAGER_CONFIG, start_prometheus

RULES = Path(__file__).resolve().parent.parent / "alert_rules"
RUNBOOK_URL = "https://github.com/supportlens/supportlens/blob/main/alert_rules/runbooks.md#"
SEVERITIES = {"critical", "warning", "info", "none"}
pytestmark = pytest.mark.promtool


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run deploy/local/services.sh (make test does)")
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="module")
def amtool() -> str:
    return _tool("amtool")


@pytest.fixture(scope="module")
def alerts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every alerting rule as Prometheus itself loads it (name, query, duration, labels, annotations)."""
    prometheus = start_prometheus(tmp_path_factory.mktemp("rules-prometheus"))
    try:
        prometheus.wait_ready()
        groups = prometheus.get("/api/v1/rules?type=alert")["data"]["groups"]
    finally:
        prometheus.stop()
    return [rule for group in groups for rule in group["rules"]]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_rules_are_valid(promtool):
    done = subprocess.run([promtool, "check", "rules", *map(str, RULES.glob("*.rules.yml"))], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass(promtool):
    tests = sorted(RULES.glob("tests/*-test.yml"))
    assert tests
    done = subprocess.run([promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_severity_summary_description_and_runbook(alerts):
    assert len(alerts) > 1
    for alert in alerts:
        assert alert["labels"].get("severity") in SEVERITIES, alert["name"]
        for key in ("summary", "description", "runbook_url"):
            assert alert["annotations"].get(key, "").strip(), f"{alert['name']} has no {key}"


def test_every_runbook_url_has_its_section(alerts):
    headings = re.findall(r"(?m)^#+\s+(.+)$", (RULES / "runbooks.md").read_text())
    anchors = {_anchor(h) for h in headings}
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL), f"{alert['name']}: {url}"
        assert url.removeprefix(RUNBOOK_URL) == alert["name"].lower(), f"{alert['name']}: anchor is not its name"
        assert url.removeprefix(RUNBOOK_URL) in anchors, f"{alert['name']}: no section in runbooks.md"


def test_every_alert_is_unit_tested(alerts):
    tested = {
        name for path in RULES.glob("tests/*-test.yml")
        for name in re.findall(r"(?m)^\s*alertname:\s*[\"']?([\w:]+)", path.read_text())
    }
    untested = {alert["name"] for alert in alerts} - tested
    assert not untested, f"no promtool test names {sorted(untested)}"


def test_alertmanager_config_is_valid(amtool):
    done = subprocess.run([amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    ({"alertname": "Watchdog", "severity": "none"}, "watchdog"),
    ({"alertname": "IncidentOpen", "severity": "critical", "drill": "false", "incident_id": "i-1"}, "incidents"),
    ({"alertname": "IncidentUnresolvedOneHour", "severity": "critical", "drill": "false"}, "incidents"),
    ({"alertname": "FaultReportSurge", "severity": "warning"}, "incidents"),
    ({"alertname": "DrillIncidentOpen", "severity": "info", "drill": "true", "incident_id": "d-1"}, "drill"),
    ({"alertname": "SinkFailing", "severity": "critical"}, "oncall"),
    ({"alertname": "SupportlensTargetDown", "severity": "critical"}, "oncall"),
])
def test_alerts_route_to_their_receiver(amtool, labels, receiver):
    done = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", f"--verify.receivers={receiver}",
         *(f"{k}={v}" for k, v in labels.items())],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
