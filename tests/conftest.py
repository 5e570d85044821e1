"""Test fixtures: one real Kafka broker per test session, fresh topic names per test.

The broker is, in order of preference: ``KAFKA_BOOTSTRAP`` if set; a testcontainers
Kafka when a Docker engine answers; else the project's own runner
(``deploy/local/kafka.sh``), which starts Apache Kafka from the official jars.
Tests that use the broker must carry ``@pytest.mark.kafka``: it keeps the fast,
pure tests honest about needing nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import free_port
from supportlens.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = ROOT / "deploy" / "local" / "kafka.sh"


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    how: str  # env | testcontainers | local-jars
    state_dir: Path | None = None


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # any failure means: no usable engine here
        return False


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield Broker(os.environ["KAFKA_BOOTSTRAP"], "env")
        return
    if _docker_reachable():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.2").with_kraft() as container:
            yield Broker(container.get_bootstrap_server(), "testcontainers")
        return
    state = tmp_path_factory.mktemp("kafka-state")
    port = free_port()
    controller = free_port()
    env = {**os.environ, "SUPPORTLENS_STATE_DIR": str(state), "KAFKA_PORT": str(port),
           "KAFKA_CONTROLLER_PORT": str(controller)}
    subprocess.run([str(KAFKA_SCRIPT), "start"], env=env, check=True)
    try:
        yield Broker(f"127.0.0.1:{port}", "local-jars", state)
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def kafka(request: pytest.FixtureRequest, broker: Broker) -> Broker:
    if request.node.get_closest_marker("kafka") is None:
        pytest.fail("a test that uses Kafka must be marked @pytest.mark.kafka")
    return broker


@pytest.fixture
def settings(kafka: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for one test: the session broker, its own topic prefix and state dir."""
    for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)
    return load_settings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=3,
        state_dir=tmp_path / "state",
    )
