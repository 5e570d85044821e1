"""The CLI as a user meets it: clear messages and hints for mistakes, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from helpers import settings_env, supportlens_cmd


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    base.update(NO_COLOR="1", COLUMNS="200")
    return subprocess.run(supportlens_cmd(*args), env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "message", "hint"),
    [
        (("simulate", "--scenario", "outage"), {}, "unknown scenario 'outage'", "lists the scenarios"),
        (("simulate", "--rate", "-3"), {}, "--rate must be above 0", ""),
        (("config",), {"SUPPORTLENS_PARTITIONS": "zero"}, "invalid configuration: partitions: Input should be a valid integer", "README"),
        (("--config", "/nonexistent.toml", "config"), {}, "config file /nonexistent.toml does not exist", "--config"),
        (("validate", "--kind", "spam", "README.md"), {}, "unknown kind 'spam'", "span, fault-report, behaviour, account"),
    ],
)
def test_user_mistakes_get_a_message_and_a_hint(args, env, message, hint):
    done = _run(*args, env=env)
    assert done.returncode == 2
    assert f"error: {message}" in done.stderr
    assert hint in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_unreachable_kafka_is_explained_not_dumped():
    done = _run("topics", "create", env={"SUPPORTLENS_KAFKA_BOOTSTRAP": f"127.0.0.1:{_closed_port()}"})
    assert done.returncode == 2
    assert "error: cannot reach Kafka at 127.0.0.1:" in done.stderr
    assert "make kafka-start" in done.stderr
    assert "Traceback" not in done.stderr


def test_usage_errors_are_clicks_own_short_message():
    done = _run("simulate", "--duration", "soon")
    assert done.returncode == 2
    assert "Invalid value for '--duration'" in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_lists_each_bad_line_with_its_field(tmp_path):
    records = tmp_path / "spans.jsonl"
    records.write_text(
        '{"request_id":"r1","side":"client","service":"app","start_us":1,"duration_us":2,"status":"ok"}\n'
        '{"request_id":"r2","side":"client","service":"app","start_us":1,"duration_us":2,"status":"fine"}\n'
        "\n"
        '{"side":"server","service":"api","start_us":1,"duration_us":2,"status":"ok"}\n'
    )
    done = _run("validate", "--kind", "span", str(records))
    assert done.returncode == 1
    assert "line 2: field `status`: invalid enum value 'fine'" in done.stdout
    assert "line 4: object missing required field `request_id`" in done.stdout
    assert "1 of 3 records valid" in done.stdout


def test_config_shows_settings_with_the_password_masked():
    done = _run("config", env={"SUPPORTLENS_KAFKA_SASL_PASSWORD": "s3cret-pw", "SUPPORTLENS_PARTITIONS": "12"})
    assert done.returncode == 0, done.stderr
    assert "s3cret-pw" not in done.stdout
    assert "**********" in done.stdout
    assert "12" in done.stdout


@pytest.mark.kafka
def test_simulating_before_topics_exist_says_what_to_run(settings, tmp_path):
    done = subprocess.run(
        supportlens_cmd("simulate", "--duration", "1", "--labels", str(tmp_path / "l.jsonl")),
        env=settings_env(settings), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "error: missing topics:" in done.stderr and "supportlens topics create" in done.stderr
