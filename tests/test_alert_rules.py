"""Prometheus rules pass promtool's checks and unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "alert_rules"
pytestmark = pytest.mark.promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run deploy/local/services.sh (make test does)")
    return path


def test_rules_are_valid(promtool):
    done = subprocess.run([promtool, "check", "rules", *map(str, RULES.glob("*.rules.yml"))], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass(promtool):
    tests = sorted(RULES.glob("tests/*-test.yml"))
    assert tests
    done = subprocess.run([promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
