"""Changes (issue #17): deploys, config changes, feature flags, infrastructure changes.

Posted to the gateway (over real HTTP, into memory; then on the real broker, with the
README's CI/CD curl command run as written) or on the command line, stored by the real
sink in real ClickHouse (a bad one dead-lettered with its reason), and listed by
``supportlens changes``. The dashboards' annotation over the same table is tested with
every other dashboard query in ``test_dashboards_clickhouse.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from helpers import free_port, insert_records, settings_env, supportlens_cmd
from sinks.clickhouse_sink import ClickHouseSink
from streams.catalog import load_catalog
from supportlens import contracts, store
from supportlens.cli import app
from supportlens.config import Settings, load_settings
from supportlens.contracts import Change, IncidentEvent, Suspect
from supportlens.gateway.access import key_sha256, keys_file_lines, new_key
from supportlens.gateway.server import open_site
from supportlens.metrics import Metrics
from supportlens.store.lookup import LookupInputError
from supportlens.support.access import DirectSupport, RemoteSupport
from supportlens.support.api import build_support_app
from supportlens.topic_reader import end_offsets, read_range
from supportlens.topics import provision
from test_gateway_http import call, gateway, post_json, serving  # noqa: F401 - `gateway` is a fixture
from test_gateway_kafka import kafka_gateway, landed

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
CLOCK_US = 1_700_000_000_000_000  # the in-memory gateway's clock
NEW_SERVICE = "brand-new-service"  # deployed before the catalogue knows it
DEPLOY = {"change_id": "deploy-payment-1.4.2", "kind": "deploy", "service": "payment", "version": "1.4.2",
          "from_version": "1.4.1", "region": "eu-west", "started_at_us": CLOCK_US - 60_000_000, "author": "ann",
          "link": "https://ci.example.com/pipelines/8812"}


def _keys_file(tmp_path: Path) -> tuple[Path, str]:
    """A keys file with one app, ``ci``, and its key."""
    key = new_key()
    path = tmp_path / "gateway-keys.toml"
    path.write_text(keys_file_lines("ci", [key_sha256(key)]), encoding="utf-8")
    return path, key


# --- the endpoint, storing into memory -----------------------------------------------------


def test_changes_are_stored_keyed_by_their_id_on_the_changes_topic(gateway):
    assert NEW_SERVICE not in load_catalog().services
    posted = [DEPLOY, {"change_id": "flag-dark-mode", "kind": "feature_flag", "service": NEW_SERVICE,
                       "description": "dark mode for 10 % of users", "ticket": "OPS-7"}]
    with gateway() as served:
        one = post_json(f"{served.url}/v1/changes", DEPLOY)
        many = post_json(f"{served.url}/v1/changes", posted)
    assert (one.status, one.json()) == (202, {"accepted": 1, "change_ids": ["deploy-payment-1.4.2"]})
    assert (many.status, many.json()) == (202, {"accepted": 2, "change_ids": ["deploy-payment-1.4.2",
                                                                              "flag-dark-mode"]})
    records = served.sink.on("changes")
    assert [r.key for r in records] == ["deploy-payment-1.4.2", "deploy-payment-1.4.2", "flag-dark-mode"]
    assert len(served.sink.records) == 3  # on no other topic
    deploy, _, flag = (contracts.decode(r.value, Change) for r in records)
    assert deploy == msgspec.convert(DEPLOY, Change)
    # a service the catalogue does not know is kept; no start time: when the gateway received it;
    # a field this version does not know is kept in attributes
    assert (flag.service, flag.started_at_us, flag.attributes) == (NEW_SERVICE, CLOCK_US, {"ticket": "OPS-7"})


@pytest.mark.parametrize(("body", "message"), [
    ({**DEPLOY, "kind": "rollback"}, "invalid change: field `kind`: invalid enum value 'rollback'"),
    ({**DEPLOY, "link": "ci/8812"}, "invalid change: field `link`: expected `str` matching regex"),
    ({**DEPLOY, "service": ""}, "invalid change: field `service`: expected `str` of length >= 1"),
    ({**DEPLOY, "started_at_us": "soon"}, "invalid change: field `started_at_us`: expected `int`, got `str`"),
    ({**DEPLOY, "change_id": "has spaces"}, "invalid change: field `change_id`"),
    ({k: v for k, v in DEPLOY.items() if k != "change_id"}, "invalid change: object missing required field "
                                                           "`change_id`"),
    ([DEPLOY, {**DEPLOY, "finished_at_us": -1}], "changes[1]: invalid change: field `finished_at_us`"),
    ([], "changes must be a change object or an array of them, got an empty array"),
    ("deploy", "changes must be a change object or an array of them, got a string"),
])
def test_a_bad_field_is_a_400_that_names_it_and_nothing_is_stored(gateway, body, message):
    with gateway() as served:
        answer = post_json(f"{served.url}/v1/changes", body)
    assert answer.status == 400
    assert answer.json()["error"].startswith(message), answer.json()
    assert served.sink.records == []


def test_changes_need_an_api_key_like_every_endpoint(gateway, tmp_path):
    keys, key = _keys_file(tmp_path)
    with gateway(gateway_api_keys_file=keys) as served:
        anonymous = post_json(f"{served.url}/v1/changes", DEPLOY)
        wrong = post_json(f"{served.url}/v1/changes", DEPLOY, {"Authorization": f"Bearer {new_key()}"})
        admitted = post_json(f"{served.url}/v1/changes", DEPLOY, {"Authorization": f"Bearer {key}"})
        not_json = call("POST", f"{served.url}/v1/changes", b"kind=deploy",
                        {"Authorization": f"Bearer {key}", "Content-Type": "application/x-www-form-urlencoded"})
    assert (anonymous.status, wrong.status, admitted.status, not_json.status) == (401, 401, 202, 415)
    assert [r.key for r in served.sink.on("changes")] == ["deploy-payment-1.4.2"]


# --- the README's CI/CD example, on the real broker ---------------------------------------


def readme_curl() -> str:
    """The curl command of the README's "Changes from a CI/CD pipeline", as written there."""
    section = README.split("### Changes from a CI/CD pipeline", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def _run_curl(command: str, url: str, key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], env={"PATH": os.environ["PATH"], "GATEWAY_URL": url,
                                                        "GATEWAY_KEY": key},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.kafka
def test_the_readme_curl_command_posts_a_change_that_lands_on_the_topic(settings, tmp_path):
    command = readme_curl()
    assert command.startswith("curl ") and '"kind": "deploy"' in command and "$GATEWAY_KEY" in command
    keys, key = _keys_file(tmp_path)
    provision(settings)
    since = end_offsets(settings, [settings.topic("changes")])
    with kafka_gateway(settings.model_copy(update={"gateway_api_keys_file": keys})) as url:
        done = _run_curl(command, url, key)
        # the same command with a field wrong, for a service the catalogue does not know, without a key
        bad = _run_curl(command.replace('"kind": "deploy"', '"kind": "rollback"'), url, key)
        unknown = _run_curl(command.replace('"service": "payment"', f'"service": "{NEW_SERVICE}"')
                            .replace("deploy-payment-1.4.2-eu-west", "deploy-new-1"), url, key)
        keyless = _run_curl(command, url, "")
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout) == {"accepted": 1, "change_ids": ["deploy-payment-1.4.2-eu-west"]}
    assert bad.returncode != 0  # --fail-with-body: the job step fails, saying why
    assert msgspec.json.decode(bad.stdout) == {"error": "invalid change: field `kind`: invalid enum value 'rollback'"}
    assert "400" in bad.stderr
    assert unknown.returncode == 0, unknown.stderr
    assert keyless.returncode != 0 and "401" in keyless.stderr
    stored = landed(settings, since, ("changes",))["changes"]
    assert [k for k, _ in stored] == ["deploy-payment-1.4.2-eu-west", "deploy-new-1"]
    deploy, new = (contracts.decode(v, Change) for _, v in stored)
    assert (deploy.kind, deploy.service, deploy.version, deploy.from_version, deploy.region, deploy.author) == \
        ("deploy", "payment", "1.4.2", "1.4.1", "eu-west", "ann")
    assert deploy.link == "https://ci.example.com/pipelines/8812"
    assert abs(deploy.started_at_us - time.time_ns() // 1000) < 60_000_000  # the gateway's clock: just now
    assert new.service == NEW_SERVICE


# --- the command line, the sink and the listing -----------------------------------------


def _store_settings(kafka, clickhouse) -> Settings:
    return load_settings(
        kafka_bootstrap=kafka.bootstrap, topic_prefix=f"c{uuid.uuid4().hex[:8]}.", partitions=3,
        clickhouse_dsn=clickhouse.dsn, clickhouse_database=f"t_{uuid.uuid4().hex[:10]}",
        sink_batch_rows=200, sink_flush_s=0.2, sink_session_timeout_s=8,
        support_url=f"http://127.0.0.1:{free_port()}",  # no support API answers: the CLI opens the store
    )


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(supportlens_cmd(*args), env=settings_env(settings), capture_output=True, text=True,
                          timeout=60)


def _wait_until(condition, timeout: float, why) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(why())
        time.sleep(0.2)


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_a_change_added_on_the_command_line_is_stored_by_the_sink_and_listed(kafka, clickhouse, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(name)
    settings = _store_settings(kafka, clickhouse)
    provision(settings)
    client = store.connect(settings)
    store.migrate(client, settings)
    started = _cli(settings, "changes", "add", "--kind", "deploy", "--service", "payment", "--version", "1.4.2",
                   "--from-version", "1.4.1", "--region", "eu-west", "--author", "ann",
                   "--link", "https://ci.example.com/pipelines/8812", "--description", "retry budget",
                   "--id", "deploy-payment-1.4.2", "--started-at", "10m")
    assert started.returncode == 0, started.stderr
    assert "posted change deploy-payment-1.4.2: payment 1.4.1 → 1.4.2 deployed in eu-west by ann" in started.stdout
    finished = _cli(settings, "changes", "add", "--kind", "deploy", "--service", "payment", "--version", "1.4.2",
                    "--from-version", "1.4.1", "--region", "eu-west", "--author", "ann",
                    "--link", "https://ci.example.com/pipelines/8812", "--description", "retry budget",
                    "--id", "deploy-payment-1.4.2", "--started-at", "10m", "--finished-at", "now")
    assert finished.returncode == 0, finished.stderr
    flag = _cli(settings, "changes", "add", "--kind", "feature_flag", "--service", NEW_SERVICE, "--author", "bob")
    assert flag.returncode == 0, flag.stderr
    old = Change(change_id="config-last-week", kind="config", service="edge",
                 started_at_us=time.time_ns() // 1000 - 7 * 86_400_000_000)
    suspect = Suspect(change_id="deploy-payment-1.4.2", kind="deploy", service="payment", version="1.4.2",
                      started_at_us=time.time_ns() // 1000 - 600_000_000, score=0.9,
                      reason="payment 1.4.2 deployed 3 min before the surge, in the failing hop")
    incident = IncidentEvent(incident_id="inc-1", sequence=1, transition="declared", at_us=time.time_ns() // 1000,
                             started_at_us=time.time_ns() // 1000, severity="sev2", title="Payments failing",
                             reason="surge on service=payment", root_key="service=payment",
                             dimensions={"service": "payment"}, services=["payment"], suspects=[suspect])
    producer = Producer(settings.producer_config())
    producer.produce(settings.topic("changes"), key=b"config-last-week", value=contracts.encode(old))
    producer.produce(settings.topic("changes"), key=b"bad", value=b'{"change_id": "bad", "kind": "rollback", '
                     b'"service": "payment", "started_at_us": 1}')
    producer.produce(settings.topic("incidents"), key=b"inc-1", value=contracts.encode(incident))
    assert producer.flush(10) == 0

    stop = threading.Event()
    sink = ClickHouseSink(settings, store.connect(settings), Metrics(CollectorRegistry()), stop)
    thread = threading.Thread(target=sink.run, name="sink-under-test", daemon=True)
    thread.start()
    try:
        def stored() -> tuple[int, ...]:
            return (*(client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
                      for table in ("changes", "incidents", "dead_letters")),
                    client.query("SELECT count() FROM changes FINAL WHERE finished_at IS NOT NULL").result_rows[0][0])
        # four posts, three changes: the last post of each is kept
        _wait_until(lambda: stored() == (3, 1, 1, 1), 30,
                    lambda: f"changes, incidents, dead letters, finished changes: {stored()}")
    finally:
        stop.set()
        thread.join(30)

    # the re-post replaced the first: one row, finished
    flag_id = flag.stdout.split()[2].rstrip(":")  # "posted change chg-…: brand-new-service flag changed by bob"
    rows = {r[0]: r[1:] for r in client.query(
        "SELECT change_id, kind, service, version, from_version, region, author, finished_at IS NOT NULL "
        "FROM changes FINAL").result_rows}
    assert set(rows) == {"config-last-week", "deploy-payment-1.4.2", flag_id}
    assert rows["deploy-payment-1.4.2"] == ("deploy", "payment", "1.4.2", "1.4.1", "eu-west", "ann", True)
    assert rows[flag_id] == ("feature_flag", NEW_SERVICE, "", "", "", "bob", False)
    [(suspects,)] = client.query("SELECT suspects FROM incidents_current WHERE incident_id = 'inc-1'").result_rows
    assert msgspec.json.decode(suspects, type=list[Suspect]) == [suspect]
    [(reason, value)] = client.query("SELECT reason, value FROM dead_letters WHERE source_topic = {t:String}",
                                     parameters={"t": settings.topic("changes")}).result_rows
    assert reason == "field `kind`: invalid enum value 'rollback'"  # as for every record: the reason alone
    assert '"rollback"' in value
    [dead] = list(read_range(settings, [settings.topic("dlq")]))
    assert dict(dead.headers())["reason"].decode() == reason

    # listed latest first, in the window; --service keeps one service's
    runner = CliRunner()
    env = {**settings_env(settings), "COLUMNS": "200"}
    listed = runner.invoke(app, ["changes", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    found = msgspec.json.decode(listed.stdout)
    assert [c["change_id"] for c in found["rows"]] == [flag_id, "deploy-payment-1.4.2"]  # not last week's
    assert found["rows"][1]["finished_at_us"] > found["rows"][1]["started_at_us"]
    payment = msgspec.json.decode(runner.invoke(app, ["changes", "--service", "payment", "--json"], env=env).stdout)
    assert [c["change_id"] for c in payment["rows"]] == ["deploy-payment-1.4.2"]
    week = msgspec.json.decode(runner.invoke(app, ["changes", "--since", "8d", "--json"], env=env).stdout)
    assert [c["change_id"] for c in week["rows"]][-1] == "config-last-week"
    table = runner.invoke(app, ["changes"], env=env)
    assert table.exit_code == 0, table.output
    assert "deploy-payment-1.4.2" in table.stdout and flag_id in table.stdout  # ids print whole
    assert "2 changes since" in table.stdout


@pytest.mark.clickhouse
def test_the_support_api_lists_what_the_store_lists(store_settings):
    """While `supportlens serve` holds the embedded store, `supportlens changes` asks its API."""
    client = store.connect(store_settings)
    store.migrate(client, store_settings)
    now = time.time_ns() // 1000
    insert_records(client, "changes", [
        msgspec.convert({**DEPLOY, "started_at_us": now - 3_600_000_000}, Change),
        Change(change_id="config-edge", kind="config", service="edge", started_at_us=now - 60_000_000),
        Change(change_id="drill-deploy", kind="deploy", service="edge", started_at_us=now, drill=True),
    ])
    direct = DirectSupport(client)
    port = free_port()

    async def main(stop: asyncio.Event) -> None:
        runner = await open_site(build_support_app(direct, CollectorRegistry()), "127.0.0.1", port)
        await stop.wait()
        await runner.cleanup()

    with serving(main, port):
        remote = RemoteSupport(f"http://127.0.0.1:{port}")
        everything = remote.recent_changes(now - 86_400_000_000, now, "", 200)
        edge = remote.recent_changes(now - 86_400_000_000, now, "edge", 200)
        with pytest.raises(LookupInputError, match="is not a service name"):
            remote.recent_changes(now - 86_400_000_000, now, "edge\x00", 200)
        with pytest.raises(LookupInputError, match="limit 0 is out of range"):
            remote.recent_changes(now - 86_400_000_000, now, "", 0)
    assert everything == direct.recent_changes(now - 86_400_000_000, now, "", 200)
    assert [c.change_id for c in everything.rows] == ["config-edge", "deploy-payment-1.4.2"]  # no drill
    assert [c.change_id for c in edge.rows] == ["config-edge"]
    assert everything.rows[1].from_version == "1.4.1" and everything.rows[1].finished_at_us is None


@pytest.mark.parametrize(("args", "message", "hint"), [
    (("add", "--kind", "rollback", "--service", "payment"), "error: --kind: unknown kind 'rollback'",
     "deploy, config, feature_flag, infra"),
    (("add", "--kind", "deploy", "--service", "payment", "--link", "ci/8812"),
     "error: --link: invalid change: field `link`", "http(s) URL"),
    (("add", "--kind", "deploy", "--service", ""), "error: --service: invalid change: field `service`", ""),
    (("add", "--kind", "deploy", "--service", "payment", "--id", "two words"), "error: --id: invalid change", ""),
    (("add", "--kind", "deploy", "--service", "payment", "--started-at", "soon"), "error: --started-at: 'soon' is "
     "not a time", "ISO time"),
    (("add", "--kind", "deploy", "--service", "payment", "--started-at", "now", "--finished-at", "1h"),
     "error: --finished-at is before --started-at", ""),
    (("--since", "forever"), "error: 'forever' is not a duration", "24h"),
])
def test_command_line_mistakes_get_a_message_and_a_hint(tmp_path, args, message, hint):
    # none of these reaches Kafka or ClickHouse: both are unreachable here
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    env.update(NO_COLOR="1", COLUMNS="200", SUPPORTLENS_KAFKA_BOOTSTRAP="127.0.0.1:1",
               SUPPORTLENS_STATE_DIR=str(tmp_path), SUPPORTLENS_SUPPORT_URL=f"http://127.0.0.1:{free_port()}")
    done = subprocess.run(supportlens_cmd("changes", *args), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert hint in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.kafka
def test_adding_a_change_before_the_topics_exist_says_what_to_run(settings):
    done = subprocess.run(supportlens_cmd("changes", "add", "--kind", "deploy", "--service", "payment"),
                          env=settings_env(settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "missing topics" in done.stderr and "supportlens topics create" in done.stderr
    assert "Traceback" not in done.stderr
