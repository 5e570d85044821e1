"""Secrets are masked in every log record, whoever logs them and however."""

from __future__ import annotations

import logging

import pytest

from supportlens.config import load_settings
from supportlens.log_redaction import keep_secrets_out_of_logs, redact


def test_every_secret_of_the_settings_is_known_including_one_inside_a_dsn():
    settings = load_settings(
        kafka_sasl_password="kafka-pw", notify_webhook_secret="hook-key", grafana_token="glsa_t",
        kafka_client={"sasl.password": "in-client", "ssl.key.password": "key-pw"},
        clickhouse_dsn="https://ops:dsn-pw@ch.internal:8443/", smtp_password="mail-pw",
    )
    assert set(settings.secret_values()) == {"kafka-pw", "hook-key", "glsa_t", "in-client", "key-pw", "dsn-pw",
                                             "mail-pw"}
    assert load_settings().secret_values() == ()


def test_a_library_logging_a_secret_as_an_argument_as_bytes_or_in_a_traceback_shows_a_mask(caplog):
    secret = "pa$$-w0rd\u00e9"
    keep_secrets_out_of_logs([secret])
    library = logging.getLogger("aiokafka.conn.for_test")
    with caplog.at_level(logging.DEBUG):
        library.debug("Request: SaslAuthenticateRequest(sasl_auth_bytes=%r)", b"u\x00u\x00" + secret.encode())
        library.info("login with %s as %s", secret, "svc")
        try:
            raise RuntimeError(f"refused {secret}")
        except RuntimeError:
            library.exception("failed")
        library.info("nothing secret in %s", "here")
    text = caplog.text
    assert "pa$$-w0rd" not in text and "pa$$-w0rd\\xc3\\xa9" not in text
    assert text.count("***") == 3
    assert "login with *** as svc" in text and "nothing secret in here" in text


@pytest.mark.parametrize("text, expected", [("a-secret-b", "a***b"), ("secret", "***"), ("plain", "plain")])
def test_redact_masks_each_occurrence(text, expected):
    assert redact(text, ["-secret-", "secret"]) == expected
