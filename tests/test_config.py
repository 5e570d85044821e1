"""Settings: flags over environment over file over defaults; secrets masked; bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from supportlens.config import load_settings
from supportlens.errors import UserError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)


def test_defaults_put_the_embedded_store_under_the_state_dir(tmp_path):
    settings = load_settings(state_dir=tmp_path)
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.clickhouse_dsn == f"chdb://{tmp_path}/clickhouse"
    assert settings.topic("client-spans") == "supportlens.client-spans"


def test_flags_beat_environment_which_beats_the_file(tmp_path, monkeypatch):
    config = tmp_path / "supportlens.toml"
    config.write_text(
        'kafka_bootstrap = "file:9092"\ntopic_prefix = "file."\npartitions = 2\n'
        '[kafka_client]\n"security.protocol" = "SASL_SSL"\n'
    )
    monkeypatch.setenv("SUPPORTLENS_TOPIC_PREFIX", "env.")
    monkeypatch.setenv("SUPPORTLENS_PARTITIONS", "4")
    settings = load_settings(config, partitions=8, kafka_bootstrap=None)
    assert settings.kafka_bootstrap == "file:9092"  # only the file sets it; a None flag is no flag
    assert settings.topic_prefix == "env."
    assert settings.partitions == 8
    assert settings.kafka_config()["security.protocol"] == "SASL_SSL"


def test_the_config_file_can_come_from_the_environment(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text('topic_prefix = "x."\n')
    monkeypatch.setenv("SUPPORTLENS_CONFIG", str(config))
    assert load_settings().topic_prefix == "x."


def test_secrets_reach_the_client_but_never_the_printed_view(monkeypatch):
    monkeypatch.setenv("SUPPORTLENS_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("SUPPORTLENS_KAFKA_SASL_PASSWORD", "hunter2")
    settings = load_settings()
    assert settings.kafka_config()["sasl.password"] == "hunter2"
    assert "hunter2" not in str(settings.public_view())
    assert "hunter2" not in repr(settings)


def test_settings_are_frozen():
    settings = load_settings()
    with pytest.raises(Exception):
        settings.partitions = 99  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SUPPORTLENS_PARTITIONS": "0"}, "partitions: Input should be greater than or equal to 1"),
        ({"SUPPORTLENS_PARTITIONS": "many"}, "partitions: Input should be a valid integer"),
        ({"SUPPORTLENS_LOCALES": '["fr"]'}, "locales: Value error, supported locales are en, zh-CN"),
        ({"SUPPORTLENS_NO_SUCH_SETTING": "1"}, None),  # unknown env vars are ignored, not fatal
    ],
)
def test_bad_values_are_user_errors_naming_the_setting(monkeypatch, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if expected is None:
        assert load_settings().partitions == 6
        return
    with pytest.raises(UserError) as caught:
        load_settings()
    assert expected in caught.value.message
    assert "README" in caught.value.hint


def test_a_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_unknown_keys_in_the_file_are_rejected(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("partitons = 3\n")
    with pytest.raises(UserError, match="partitons"):
        load_settings(config)


def test_producers_partition_like_the_java_clients_so_joined_topics_stay_co_partitioned():
    settings = load_settings()
    assert settings.producer_config()["partitioner"] == "murmur2_random"
    assert "partitioner" not in settings.kafka_config()


def test_a_child_process_resolves_the_same_settings_from_as_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPPORTLENS_KAFKA_SASL_PASSWORD", "pw")
    original = load_settings(partitions=9, state_dir=tmp_path, locales=("zh-CN", "en"),
                             kafka_client={"security.protocol": "SSL"}, correlation_grace_s=2.5)
    monkeypatch.delenv("SUPPORTLENS_KAFKA_SASL_PASSWORD")
    for key, value in original.as_env().items():
        monkeypatch.setenv(key, value)
    again = load_settings()
    assert again.model_dump() == original.model_dump()
    assert again.kafka_sasl_password.get_secret_value() == "pw"


def test_clickhouse_settings_are_checked_and_the_dsn_password_is_masked():
    settings = load_settings(clickhouse_dsn="http://support:s3cret@ch.internal:8123", clickhouse_ttl_days={"spans": 3})
    assert settings.clickhouse_ttl_days["spans"] == 3 and settings.clickhouse_ttl_days["requests"] == 90
    assert "s3cret" not in str(settings.public_view()) and not settings.embedded_store
    assert settings.support_url == "http://127.0.0.1:8481"
    with pytest.raises(UserError, match="no table named spanz"):
        load_settings(clickhouse_ttl_days={"spanz": 3})
    with pytest.raises(UserError, match="clickhouse_database"):
        load_settings(clickhouse_database="x; DROP")


def test_secrets_can_come_from_files_in_a_secrets_directory_the_environment_winning(tmp_path, monkeypatch):
    for key in ("SUPPORTLENS_KAFKA_SASL_PASSWORD", "SUPPORTLENS_NOTIFY_WEBHOOK_SECRET", "SUPPORTLENS_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "supportlens_kafka_sasl_password").write_text("from-a-file\n")
    (tmp_path / "supportlens_notify_webhook_secret").write_text("hook-from-file")
    monkeypatch.setenv("SUPPORTLENS_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("SUPPORTLENS_NOTIFY_WEBHOOK_SECRET", "hook-from-env")
    settings = load_settings()
    assert settings.kafka_config()["sasl.password"] == "from-a-file"
    assert settings.notify_webhook_secret.get_secret_value() == "hook-from-env"
    monkeypatch.setenv("SUPPORTLENS_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="secrets directory .* does not exist"):
        load_settings()
