"""The one Kafka security configuration reaches the worker's client (aiokafka under Faust) too.

Pure tests of the translation; ``test_security_kafka.py`` runs every process on a broker
that demands SASL.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from faust.auth import SASLCredentials, SSLCredentials

from supportlens.config import load_settings
from supportlens.errors import UserError
from supportlens.kafka_security import faust_credentials


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made by openssl as an operator would."""
    folder = tmp_path_factory.mktemp("pem")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def _settings(client: dict[str, str], **extra):
    return load_settings(kafka_client=client, **extra)


def test_plaintext_needs_no_credentials():
    assert faust_credentials(_settings({})) is None


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_over_tls_carries_the_user_the_mechanism_and_the_ca(mechanism, pem):
    cert, _key = pem
    credentials = faust_credentials(_settings(
        {"security.protocol": "SASL_SSL", "sasl.mechanism": mechanism, "ssl.ca.location": str(cert)},
        kafka_sasl_username="svc", kafka_sasl_password="pw-123"))
    assert isinstance(credentials, SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == ("svc", "pw-123", mechanism)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED and credentials.ssl_context.check_hostname
    assert "pw-123" not in repr(credentials)  # Faust logs its configuration


def test_sasl_without_tls_and_a_client_certificate_with_tls(pem):
    cert, key = pem
    plain = faust_credentials(_settings({"security.protocol": "sasl_plaintext"},
                                        kafka_sasl_username="svc", kafka_sasl_password="pw"))
    assert isinstance(plain, SASLCredentials) and plain.protocol.value == "SASL_PLAINTEXT" and plain.ssl_context is None
    mutual = faust_credentials(_settings({"security.protocol": "SSL", "ssl.ca.location": str(cert),
                                          "ssl.certificate.location": str(cert), "ssl.key.location": str(key),
                                          "ssl.endpoint.identification.algorithm": "none"}))
    assert isinstance(mutual, SSLCredentials)
    assert mutual.context.verify_mode == ssl.CERT_REQUIRED and not mutual.context.check_hostname


@pytest.mark.parametrize("client, extra, words", [
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "GSSAPI"}, {"kafka_sasl_username": "u",
                                                                     "kafka_sasl_password": "p"}, "GSSAPI"),
    ({"security.protocol": "SASL_PLAINTEXT"}, {}, "SASL user name and password"),
    ({"security.protocol": "SSL", "ssl.keystore.location": "/etc/kafka.p12"}, {}, "ssl.keystore.location"),
    ({"security.protocol": "SSL", "ssl.ca.location": "/nowhere/ca.pem"}, {}, "cannot load the Kafka TLS files"),
    ({"security.protocol": "TLS"}, {}, "is not one of"),
])
def test_what_the_worker_cannot_honour_is_refused_by_name(client, extra, words):
    with pytest.raises(UserError, match=words):
        faust_credentials(_settings(client, **extra))
