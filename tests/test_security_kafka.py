"""Every process on a broker that demands SASL, with every secret set, and no secret in any output.

A broker of this module's own (``deploy/local/kafka.sh`` with ``KAFKA_SASL_PLAIN_USERS``)
refuses clients that do not log in. The whole pipeline runs against it — topics,
``serve`` (the Faust worker, the ClickHouse sink, the support API), the gateway, ``notify``
and the simulator — with the Kafka password, the webhook secret, the SMTP password and the
Grafana token set through the environment, as the README says they must be. Then every
line any of them printed is searched for every secret.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos import Service
from conftest import KAFKA_SCRIPT
from helpers import free_port, settings_env, supportlens_cmd
from supportlens.config import Settings, load_settings
from supportlens.serve import READY_LINE
from supportlens.simulator.labels import read_run
from supportlens.support.access import RemoteSupport
from test_gateway_http import otlp_request, otlp_span, post_json

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

USER = "supportlens"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(bootstrap, password) of a broker whose only listener asks for SASL/PLAIN."""
    password = secrets.token_urlsafe(18)
    state = tmp_path_factory.mktemp("sasl-kafka")
    port, controller = free_port(), free_port()
    env = {**os.environ, "SUPPORTLENS_STATE_DIR": str(state), "KAFKA_PORT": str(port),
           "KAFKA_CONTROLLER_PORT": str(controller), "KAFKA_SASL_PLAIN_USERS": f"{USER}:{password},other:x"}
    subprocess.run([str(KAFKA_SCRIPT), "start"], env=env, check=True)
    try:
        yield f"127.0.0.1:{port}", password
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)


def _settings(bootstrap: str, password: str, tmp_path: Path, **extra) -> Settings:
    return load_settings(
        kafka_bootstrap=bootstrap, kafka_client={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN"},
        kafka_sasl_username=USER, kafka_sasl_password=password, topic_prefix=f"k{uuid.uuid4().hex[:8]}.",
        partitions=2, state_dir=tmp_path / "state", support_port=free_port(), gateway_port=free_port(),
        correlation_grace_s=2, correlation_settle_s=0.5, **extra,
    )


def _run(settings: Settings, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(supportlens_cmd(*args), env=env or settings_env(settings), capture_output=True, text=True,
                          timeout=180)


def test_every_process_logs_in_with_sasl_and_no_output_shows_a_secret(sasl_broker, clickhouse, tmp_path):
    bootstrap, password = sasl_broker
    secret_values = {
        "kafka password": password,
        "webhook secret": secrets.token_hex(16),
        "smtp password": secrets.token_urlsafe(12),
        "grafana token": f"glsa_{secrets.token_hex(12)}",
    }
    settings = _settings(bootstrap, password, tmp_path, notify_webhook_secret=secret_values["webhook secret"],
                         smtp_password=secret_values["smtp password"], grafana_token=secret_values["grafana token"],
                         notify_metrics_port=0)
    outputs: dict[str, str] = {}
    for args in (("topics", "create"), ("config",)):
        done = _run(settings, *args)
        assert done.returncode == 0, done.stderr
        outputs[" ".join(args)] = done.stdout + done.stderr
    assert "***" in outputs["config"]  # shown masked

    serve = Service(settings, tmp_path / "serve.log", "serve", "--loglevel", "debug").wait_for(READY_LINE)
    gateway = Service(settings, tmp_path / "gateway.log", "gateway").wait_for("gateway listening")
    notify = Service(settings, tmp_path / "notify.log", "notify", "--loglevel", "debug")
    processes = (serve, gateway, notify)
    try:
        simulated = _run(settings, "simulate", "--scenario", "service-outage", "--rate", "40", "--duration", "5",
                         "--labels", str(tmp_path / "labels.jsonl"))
        assert simulated.returncode == 0, simulated.stderr
        outputs["simulate"] = simulated.stdout + simulated.stderr
        url = f"http://127.0.0.1:{settings.gateway_port}"
        answer = post_json(f"{url}/v1/traces", otlp_request([otlp_span(f"r-{uuid.uuid4()}")],
                                                            **{"service.name": "app", "supportlens.consent": "granted"}))
        assert answer.status == 200, answer.body
        remote = RemoteSupport(settings.support_url)
        # as many as were sent: the simulator's rate follows the time of day (the OTLP span above
        # is from 2023, past the tables' retention, so it is not counted)
        expected = read_run(tmp_path / "labels.jsonl").visible_requests
        deadline = time.monotonic() + 150
        while True:  # the worker (aiokafka) correlated and the sink (librdkafka) stored, both logged in
            rows = remote.table_counts().rows
            if rows["requests"] >= expected and rows["spans"] >= expected:
                break
            assert time.monotonic() < deadline and serve.alive, (rows, serve.tail())
            time.sleep(1.0)
    finally:
        for process in processes:
            process.stop()
    for process in processes:
        outputs[process.log.name] = process.log.read_text(errors="replace")
    assert "Authenticated as supportlens via PLAIN" in outputs["serve.log"]  # the Faust worker logged in with SASL

    wrong = {**settings_env(settings), "SUPPORTLENS_KAFKA_SASL_PASSWORD": "not-" + password}
    refused = _run(settings, "topics", "list", env=wrong)
    assert refused.returncode != 0 and "refused the login of user 'supportlens'" in refused.stderr
    assert "Traceback" not in refused.stderr
    outputs["refused login"] = refused.stdout + refused.stderr

    assert sum(len(text.splitlines()) for text in outputs.values()) > 200  # something to search in
    for name, value in secret_values.items():
        leaks = [where for where, text in outputs.items() if value in text]
        assert leaks == [], f"the {name} was printed by {leaks}"
