"""Test fixtures: one real Kafka broker per test session, fresh topic names per test.

The broker is, in order of preference: ``KAFKA_BOOTSTRAP`` if set; a testcontainers
Kafka when a Docker engine answers; else the project's own runner
(``deploy/local/kafka.sh``), which starts Apache Kafka from the official jars.
Tests that use the broker must carry ``@pytest.mark.kafka``: it keeps the fast,
pure tests honest about needing nothing.

ClickHouse likewise: ``CLICKHOUSE_URL`` (a server DSN such as
``http://default:@localhost:8123``) if set; a testcontainers ClickHouse server when
Docker answers; else the embedded engine (chDB) in a session directory. Tests that use
it carry ``@pytest.mark.clickhouse`` and get a database of their own. chDB allows one
store path per process, so the test process uses one path for the whole session, and
subprocesses that own a store get their own paths (:func:`subprocess_dsn`).
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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-full", action="store_true",
        help="run fault-injection tests with their full fault lengths (`make chaos`); CI runs short ones",
    )


@dataclass(frozen=True)
class FaultLengths:
    """How long each injected fault lasts: the issue's lengths under `make chaos`, shorter in CI."""

    broker_down_s: float
    clickhouse_refusing_s: float


@pytest.fixture(scope="session")
def fault_lengths(request: pytest.FixtureRequest) -> FaultLengths:
    if request.config.getoption("--chaos-full"):
        return FaultLengths(broker_down_s=30.0, clickhouse_refusing_s=60.0)
    return FaultLengths(broker_down_s=10.0, clickhouse_refusing_s=15.0)


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


@dataclass(frozen=True)
class ClickHouseTarget:
    dsn: str
    how: str  # env | testcontainers | embedded

    @property
    def embedded(self) -> bool:
        return self.how == "embedded"


@pytest.fixture(scope="session")
def clickhouse_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseTarget]:
    if os.environ.get("CLICKHOUSE_URL"):
        yield ClickHouseTarget(os.environ["CLICKHOUSE_URL"], "env")
        return
    if _docker_reachable():
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer("clickhouse/clickhouse-server:25.8") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(8123)
            yield ClickHouseTarget(f"http://{container.username}:{container.password}@{host}:{port}", "testcontainers")
        return
    yield ClickHouseTarget(f"chdb://{tmp_path_factory.mktemp('chdb')}", "embedded")


@pytest.fixture
def clickhouse(request: pytest.FixtureRequest, clickhouse_target: ClickHouseTarget) -> ClickHouseTarget:
    if request.node.get_closest_marker("clickhouse") is None:
        pytest.fail("a test that uses ClickHouse must be marked @pytest.mark.clickhouse")
    return clickhouse_target


def subprocess_dsn(target: ClickHouseTarget, tmp_path: Path) -> str:
    """The DSN a subprocess should own: the same server, or an embedded store of its own."""
    return f"chdb://{tmp_path / 'store'}" if target.embedded else target.dsn


@pytest.fixture
def store_settings(clickhouse: ClickHouseTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with the session's ClickHouse and a database of this test's own."""
    for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)
    return load_settings(
        clickhouse_dsn=clickhouse.dsn, clickhouse_database=f"t_{uuid.uuid4().hex[:10]}", state_dir=tmp_path / "state"
    )


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


# --- fuzzing totals (issue #8) -----------------------------------------------------------


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """``fuzz: N generated cases over T targets, F failures`` when fuzz tests ran (CI greps it)."""
    import fuzzing

    if not fuzzing.CASES:
        return
    failed = [report for kind in ("failed", "error") for report in terminalreporter.stats.get(kind, [])
              if fuzzing.is_fuzz_test(report.nodeid)]
    terminalreporter.write_sep("-", "fuzzing")
    terminalreporter.write_line(fuzzing.summary_line(len(failed)))
