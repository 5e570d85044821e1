"""`supportlens demo` (what `make demo` runs) completes on real Kafka with a real worker."""

from __future__ import annotations

import subprocess

import pytest

from helpers import settings_env, supportlens_cmd
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
        assert f"correlated {run.visible_requests:,}" in done.stdout or f"correlated {run.requests:,}" in done.stdout
    assert "report diagnoses, all scenarios" in done.stdout  # the confusion table
    assert "a user (zh-CN) is told:" in done.stdout or "a user (en) is told:" in done.stdout
    assert "Every record landed, every request was correlated, every report diagnosed." in done.stdout
    assert "✗" not in done.stdout
    assert (tmp_path / "worker.log").stat().st_size > 0
    assert "requests of earlier runs were correlated meanwhile" in done.stdout  # counted apart, not as this run's
    assert f"Kafka at {settings.kafka_bootstrap}" in done.stdout
