"""`supportlens demo` (what `make demo` runs) completes on real Kafka with a real worker and ClickHouse."""

from __future__ import annotations

import logging
import re
import subprocess

import pytest

from helpers import settings_env, supportlens_cmd
from supportlens.demo import library_logs_to
from supportlens.simulator.labels import read_run
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topics import provision

pytestmark = pytest.mark.kafka


def test_demo_runs_every_scenario_through_a_worker_and_shows_what_it_found(settings, tmp_path):
    # an earlier demo was interrupted before its worker ran: its records wait in the demo's topics
    leftover = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}demo."})
    provision(leftover)
    simulate(leftover, SimulateOptions("normal", 30, 10, speed=0, labels_path=tmp_path / "leftover.jsonl"))
    done = subprocess.run(
        supportlens_cmd("demo", "--rate", "60", "--duration", "20", "--out", str(tmp_path)),
        env=settings_env(settings), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("service-outage", "isp-outage", "bad-release", "misuse-wave", "quiet-night"):
        assert f"{name}:" in done.stdout
        run = read_run(tmp_path / f"{name}.labels.jsonl")
        assert f"{run.counts['server-spans']:,}" in done.stdout
        # every request with a span, plus those only a fault report names (their attached client span)
        section = done.stdout.split(f"{name}:", 1)[1]
        correlated, expected = map(_number, re.search(r"correlated ([\d,]+) of ([\d,]+) requests", section).groups())
        assert correlated == expected and run.visible_requests <= expected <= run.requests
    assert "report diagnoses, all scenarios" in done.stdout  # the confusion table
    assert "a user (zh-CN) is told:" in done.stdout or "a user (en) is told:" in done.stdout
    assert "every report diagnosed and stored in ClickHouse." in done.stdout
    assert "✗" not in done.stdout
    assert b"Worker ready" in (tmp_path / "serve.log").read_bytes()
    # it ends with what support would see: one outage customer's story and the top problems
    lookup = done.stdout.split("supportlens lookup --ip", 1)[1]
    assert "report" in lookup and "server_error" in lookup and "payment" in lookup
    assert "call chain of" in lookup and "supportlens top --by service" in lookup
    top = lookup.split("supportlens top --by service", 1)[1]
    assert top.index("server_error") < top.index("payment") < top.index("network_unreachable")
    assert "requests of earlier runs were correlated meanwhile" in done.stdout  # counted apart, not as this run's
    assert f"Kafka at {settings.kafka_bootstrap}" in done.stdout
    assert "GETPID" not in done.stdout + done.stderr and (tmp_path / "demo.log").exists()
    assert "…" not in done.stdout  # no cell cut (rich's mark), ids included


def test_library_warnings_go_to_the_demo_log_not_the_terminal(tmp_path, capfd):
    with library_logs_to(tmp_path / "demo.log"):
        logging.getLogger("supportlens.kafka").warning("GETPID [thrd:main]: Failed to acquire idempotence PID")
    logging.getLogger("supportlens.kafka").warning("after the demo")  # the handler is gone again
    assert "Failed to acquire idempotence PID" in (tmp_path / "demo.log").read_text()
    assert "after the demo" not in (tmp_path / "demo.log").read_text()
    assert "GETPID" not in capfd.readouterr().err


def _number(text: str) -> int:
    return int(text.replace(",", ""))
