"""The Docker deployment: ``deploy/compose.yaml`` passes Docker Compose's own validation
(``docker-compose config``: the compose file schema, service references, conditions; no
engine needed), starts in a sound order, and agrees with the files it mounts — Prometheus'
config and rules, Grafana's provisioning, the image's sources.

Docker Compose comes from Debian (deploy/local/services.sh installs it; ``make test`` runs that).
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.build import JSON_DIR
from dashboards.provision import datasources
from supportlens.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
SUPPORTLENS_SERVICES = {"worker", "sink", "notify", "gateway", "support"}
INFRASTRUCTURE = {"kafka", "clickhouse", "prometheus", "alertmanager", "grafana"}
METRICS_PORTS = {"gateway": 8480, "worker": 8482, "sink": 8483, "notify": 8484, "support": 8481}


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is missing: run deploy/local/services.sh (make test does)")
    # no engine is asked: `config` only reads, interpolates and validates the files
    return subprocess.run([tool, "-f", str(COMPOSE), "--profile", "simulator", *args],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    done = _compose("config")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


pytestmark = pytest.mark.compose


def test_compose_validates_a_broken_file_too(tmp_path):
    # the check is real: a misspelt condition is refused
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("service_completed_successfully", "service_done", 1))
    tool = shutil.which("docker-compose")
    assert tool is not None
    done = subprocess.run([tool, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "service_done" in done.stderr


def test_every_part_of_the_platform_is_there(config):
    services = config["services"]
    assert set(services) == SUPPORTLENS_SERVICES | INFRASTRUCTURE | {"init", "simulator"}
    assert services["simulator"]["profiles"] == ["simulator"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"]


def test_long_running_services_have_health_checks_and_start_in_order(config):
    services = config["services"]
    for name in SUPPORTLENS_SERVICES | INFRASTRUCTURE:
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (name, needed)
    assert services["init"]["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                              "clickhouse": {"condition": "service_healthy"}}
    for name in SUPPORTLENS_SERVICES:
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}


def test_host_ports_leave_9093_to_a_local_kafka(config):
    published = {name: [str(p["published"]) if isinstance(p, dict) else str(p).split(":")[-2]
                        for p in service.get("ports", [])]
                 for name, service in config["services"].items()}
    assert "9093" not in sum(published.values(), [])
    assert published["alertmanager"] == ["19093"]
    assert published["grafana"] == ["3000"] and published["prometheus"] == ["9090"]


def _mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a volume, in the short (v1) or the long (v2) form `config` prints."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return source, target


def test_every_mounted_file_exists(config):
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source, _ = _mount(volume)
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_every_process_under_a_supportlens_job():
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert all(job.startswith("supportlens") for job in targets)
    assert sorted(sum(targets.values(), [])) == sorted(f"{name}:{port}" for name, port in METRICS_PORTS.items())


@pytest.mark.promtool
def test_prometheus_config_and_its_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run deploy/local/services.sh (make test does)")
    # the container path of the rules is where compose mounts them; here they are in the repo
    text = (DEPLOY / "prometheus.yml").read_text().replace(
        "/etc/prometheus/rules/supportlens.rules.yml", str(ROOT / "alert_rules" / "supportlens.rules.yml"))
    (tmp_path / "prometheus.yml").write_text(text)
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_is_provisioned_with_what_a_push_would_write(config):
    """The file-provisioned datasources equal `supportlens dashboards push`'s for the same ClickHouse."""
    grafana_env = config["services"]["grafana"]["environment"]
    app_env = config["services"]["worker"]["environment"]

    def substitute(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("$"):
            return grafana_env[value.lstrip("$")]
        if isinstance(value, dict):
            return {k: substitute(v) for k, v in value.items()}
        return value

    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/supportlens.yaml").read_text())
    from_files = {d["uid"]: {k: substitute(v) for k, v in d.items() if k != "editable"}
                  for d in provisioned["datasources"]}
    dsn = app_env["SUPPORTLENS_CLICKHOUSE_DSN"].replace("@", f":{app_env['SUPPORTLENS_CLICKHOUSE_PASSWORD']}@")
    pushed = {d["uid"]: d for d in datasources(load_settings(
        grafana_clickhouse_dsn=dsn, clickhouse_database=app_env["SUPPORTLENS_CLICKHOUSE_DATABASE"],
        grafana_prometheus_url="http://prometheus:9090"))}
    assert from_files == pushed


def test_grafana_reads_the_dashboards_that_build_writes(config):
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/supportlens.yaml").read_text())["providers"][0]
    mounts = {target: source for source, target in map(_mount, config["services"]["grafana"]["volumes"])}
    assert Path(mounts[provider["options"]["path"]]) == JSON_DIR
    assert provider["folderUid"] == "supportlens"
    home = config["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (JSON_DIR / Path(home).name).is_file()


def test_the_image_holds_every_package_the_wheel_does():
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for package in wheel["packages"]:
        assert f"COPY {package} ./{package}" in dockerfile, package
        assert f"!{package}/" in ignore, package
