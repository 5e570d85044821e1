"""``supportlens dashboards push``: what it creates, updates and leaves alone, and how it tells
a person what went wrong — against a stand-in for Grafana's API (``fake_grafana``); the same
push against a real Grafana is ``test_grafana_live.py``."""

from __future__ import annotations

import os

import pytest

from dashboards.build import all_dashboards
from dashboards.common import CLICKHOUSE_UID, FOLDER_UID, PROMETHEUS_UID
from dashboards.provision import Change, datasources, push
from fake_grafana import FakeGrafana
from helpers import free_port, supportlens_cmd
from supportlens.config import load_settings
from supportlens.errors import UserError

DSN = "http://supportlens:s3cret@clickhouse:8123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)


@pytest.fixture
def grafana():
    with FakeGrafana() as fake:
        yield fake


def _settings(url: str, **overrides):
    return load_settings(**{"grafana_url": url, "grafana_token": "good-token", "grafana_clickhouse_dsn": DSN,
                            **overrides})


def _actions(changes: list[Change]) -> dict[str, str]:
    return {change.uid: change.action for change in changes}


def test_a_first_push_creates_everything_and_a_second_changes_nothing(grafana):
    settings = _settings(grafana.url)
    first = push(settings, all_dashboards())
    uids = {FOLDER_UID, CLICKHOUSE_UID, PROMETHEUS_UID, *(d.uid for d in all_dashboards())}
    assert _actions(first) == dict.fromkeys(uids, "created")
    written = len(grafana.writes)
    second = push(settings, all_dashboards())
    assert _actions(second) == dict.fromkeys(uids, "unchanged")
    assert len(grafana.writes) == written  # not one write the second time
    stored = grafana.dashboards["supportlens-problem-trends"]
    assert stored["meta"]["folderUid"] == FOLDER_UID
    assert stored["dashboard"]["title"] == "supportlens · Global problem trends"


def test_only_what_differs_is_updated(grafana):
    settings = _settings(grafana.url)
    push(settings, all_dashboards())
    grafana.dashboards["supportlens-incidents"]["dashboard"]["title"] = "edited by hand"
    grafana.datasources[PROMETHEUS_UID]["url"] = "http://elsewhere:9090"
    changes = _actions(push(settings, all_dashboards()))
    assert changes.pop("supportlens-incidents") == "updated"
    assert changes.pop(PROMETHEUS_UID) == "updated"
    assert set(changes.values()) == {"unchanged"}
    assert grafana.datasources[PROMETHEUS_UID]["url"] == "http://127.0.0.1:9090"
    assert grafana.dashboards["supportlens-incidents"]["dashboard"]["version"] == 2


def test_a_missing_secret_is_sent_again_and_force_rewrites_everything(grafana):
    settings = _settings(grafana.url)
    push(settings, all_dashboards())
    grafana.datasources[CLICKHOUSE_UID].pop("secureJsonData")
    assert _actions(push(settings, all_dashboards()))[CLICKHOUSE_UID] == "updated"
    assert grafana.datasources[CLICKHOUSE_UID]["secureJsonData"] == {"password": "s3cret"}
    assert set(_actions(push(settings, all_dashboards(), force=True)).values()) == {"updated"}


def test_the_clickhouse_datasource_is_the_server_grafana_reaches():
    settings = load_settings(grafana_clickhouse_dsn="https://reader@ch.internal", clickhouse_password="pw",
                             clickhouse_database="support")
    clickhouse, prometheus = datasources(settings)
    assert clickhouse["jsonData"] == {"defaultDatabase": "support", "host": "ch.internal", "port": 8443,
                                      "protocol": "http", "secure": True, "username": "reader"}
    assert clickhouse["secureJsonData"] == {"password": "pw"}
    assert prometheus["url"] == "http://127.0.0.1:9090"
    # with a ClickHouse server and no Grafana-specific address, Grafana is told the same server
    server = datasources(load_settings(clickhouse_dsn="http://default:@localhost:8123"))[0]
    assert server["jsonData"]["host"] == "localhost" and "secureJsonData" not in server


def test_the_embedded_store_cannot_be_a_grafana_datasource(grafana, tmp_path):
    with pytest.raises(UserError, match="cannot read the embedded ClickHouse store") as caught:
        push(load_settings(grafana_url=grafana.url, grafana_token="good-token", state_dir=tmp_path), all_dashboards())
    assert "SUPPORTLENS_GRAFANA_CLICKHOUSE_DSN" in caught.value.hint


@pytest.mark.parametrize(("overrides", "message", "hint"), [
    ({"grafana_token": "wrong"}, "refused the credentials", "SUPPORTLENS_GRAFANA_TOKEN"),
    ({"grafana_token": None}, "no Grafana credentials", "SUPPORTLENS_GRAFANA_USER"),
    ({"grafana_url": "ftp://grafana"}, "must be an http(s) URL", "http://127.0.0.1:3000"),
])
def test_bad_credentials_and_urls_are_explained(grafana, overrides, message, hint):
    settings = _settings(grafana.url, **overrides)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        push(settings, all_dashboards())
    assert hint in caught.value.hint
    assert not grafana.writes


def test_basic_auth_works_too(grafana):
    settings = _settings(grafana.url, grafana_token=None, grafana_user="admin", grafana_password="admin")
    assert {c.action for c in push(settings, all_dashboards())} == {"created"}


def test_a_grafana_without_the_clickhouse_plugin_is_told_how_to_install_it():
    with FakeGrafana(plugin_installed=False) as fake:
        with pytest.raises(UserError, match="has no grafana-clickhouse-datasource plugin") as caught:
            push(_settings(fake.url), all_dashboards())
    assert "GF_INSTALL_PLUGINS" in caught.value.hint


def test_a_file_provisioned_datasource_is_not_overwritten(grafana):
    settings = _settings(grafana.url)
    push(settings, all_dashboards())
    grafana.datasources[PROMETHEUS_UID].update(readOnly=True, url="http://prometheus:9090")
    with pytest.raises(UserError, match="provisioned from files") as caught:
        push(settings, all_dashboards())
    assert "deploy/grafana/provisioning" in caught.value.hint


def test_a_name_taken_by_another_datasource_is_explained(grafana):
    grafana.datasources["someone-elses"] = {"uid": "someone-elses", "name": "supportlens Prometheus",
                                            "readOnly": False, "version": 1}
    with pytest.raises(UserError, match="refused to create datasource 'supportlens Prometheus'") as caught:
        push(_settings(grafana.url), all_dashboards())
    assert "rename or delete" in caught.value.hint


def _cli(*args: str, env: dict[str, str]):
    import subprocess

    base = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    return subprocess.run(supportlens_cmd(*args), env={**base, "NO_COLOR": "1", "COLUMNS": "200", **env},
                          capture_output=True, text=True, timeout=120)


def test_the_cli_pushes_and_reports_what_it_did(grafana):
    env = {"SUPPORTLENS_GRAFANA_URL": grafana.url, "SUPPORTLENS_GRAFANA_TOKEN": "good-token",
           "SUPPORTLENS_GRAFANA_CLICKHOUSE_DSN": DSN}
    first = _cli("dashboards", "push", env=env)
    assert first.returncode == 0, first.stderr
    assert "7 created, 0 updated, 0 unchanged" in first.stdout
    second = _cli("dashboards", "push", env=env)
    assert "0 created, 0 updated, 7 unchanged" in second.stdout
    assert "s3cret" not in first.stdout + second.stdout


def test_the_cli_explains_an_unreachable_grafana():
    done = _cli("dashboards", "push", env={"SUPPORTLENS_GRAFANA_URL": f"http://127.0.0.1:{free_port()}",
                                           "SUPPORTLENS_GRAFANA_TOKEN": "t", "SUPPORTLENS_GRAFANA_CLICKHOUSE_DSN": DSN})
    assert done.returncode == 2
    assert "error: cannot reach Grafana at http://127.0.0.1:" in done.stderr
    assert "SUPPORTLENS_GRAFANA_URL" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_cli_builds_the_json(tmp_path):
    done = _cli("dashboards", "build", "--out", str(tmp_path), env={})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{d.uid}.json" for d in all_dashboards())
