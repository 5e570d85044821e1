"""``supportlens dashboards push`` against a real Grafana: the folder, both datasources and every
dashboard are created, a second push changes nothing, and Grafana gives back each dashboard
exactly as built, in the supportlens folder.

Grafana is ``GRAFANA_URL`` (credentials in the URL, e.g. ``http://admin:admin@127.0.0.1:3000``,
or a service account token in ``GRAFANA_TOKEN``), else a testcontainers Grafana with the
ClickHouse plugin when a Docker engine answers. With neither, the test is skipped and the
summary says why (README "Dashboards" tells how to run it). The push logic itself always
runs against a stand-in (``test_dashboards_provision.py``) and every panel's SQL against
real ClickHouse (``test_dashboards_clickhouse.py``).
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator

import pytest

from conftest import _docker_reachable
from dashboards.build import all_dashboards
from dashboards.common import CLICKHOUSE_PLUGIN, CLICKHOUSE_UID, FOLDER_UID, PROMETHEUS_UID
from dashboards.provision import SERVER_FIELDS, connect, push
from supportlens.config import load_settings

pytestmark = pytest.mark.grafana
GRAFANA_IMAGE = "grafana/grafana:12.1.0"  # the compose deployment's


def _wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


@pytest.fixture(scope="module")
def grafana_url() -> Iterator[str]:
    if os.environ.get("GRAFANA_URL"):
        yield os.environ["GRAFANA_URL"]
        return
    if not _docker_reachable():
        pytest.skip("no Grafana to push to: set GRAFANA_URL=http://admin:admin@127.0.0.1:3000 (or GRAFANA_TOKEN), "
                    "or run where a Docker engine answers (README 'Dashboards')")
    from testcontainers.core.container import DockerContainer

    container = (DockerContainer(GRAFANA_IMAGE).with_env("GF_INSTALL_PLUGINS", CLICKHOUSE_PLUGIN)
                 .with_exposed_ports(3000))
    with container:
        url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(3000)}"
        _wait_healthy(url)
        yield url.replace("http://", "http://admin:admin@")


def test_push_creates_everything_and_a_second_push_changes_nothing(grafana_url, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)
    settings = load_settings(grafana_url=grafana_url, grafana_token=os.environ.get("GRAFANA_TOKEN"),
                             grafana_clickhouse_dsn="http://supportlens:supportlens@clickhouse:8123",
                             state_dir=tmp_path)
    dashboards = all_dashboards()
    first = push(settings, dashboards)
    assert len(first) == 3 + len(dashboards)  # a Grafana used before may hold some already: any action goes
    second = push(settings, dashboards)
    assert [(c.uid, c.action) for c in second] == [(c.uid, "unchanged") for c in first]

    grafana = connect(settings)
    assert grafana.folder.get_folder(FOLDER_UID)["title"] == "supportlens"
    clickhouse = grafana.datasource.get_datasource_by_uid(CLICKHOUSE_UID)
    assert clickhouse["type"] == CLICKHOUSE_PLUGIN and clickhouse["secureJsonFields"].get("password")
    assert grafana.datasource.get_datasource_by_uid(PROMETHEUS_UID)["type"] == "prometheus"
    for dashboard in dashboards:
        stored = grafana.dashboard.get_dashboard(dashboard.uid)
        assert stored["meta"]["folderUid"] == FOLDER_UID
        assert {k: v for k, v in stored["dashboard"].items() if k not in SERVER_FIELDS} == dashboard.to_json()
