"""Kafka security for the worker: the librdkafka options of ``kafka_client`` as Faust credentials.

Every other process talks to Kafka through confluent-kafka, which takes the librdkafka
options as they are. The worker's client is aiokafka (under Faust), which wants an
:class:`ssl.SSLContext` and a credentials object instead. One configuration must secure
both, so the options are translated here; an option that aiokafka cannot honour is refused
at start-up by name, rather than silently connecting with less security than configured.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from faust.auth import SASLCredentials, SSLCredentials
from faust.types.auth import CredentialsT

from supportlens.config import Settings
from supportlens.errors import UserError

_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# librdkafka options the translation reads; every other ssl.* / sasl.* option is refused
_UNDERSTOOD = {
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
    "ssl.endpoint.identification.algorithm", "enable.ssl.certificate.verification",
}
_HINT = "see README 'Configuration': Kafka security"


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """What the worker authenticates and encrypts with; ``None`` for a plaintext broker.

    Raises :class:`UserError` for a protocol or mechanism aiokafka does not support, an
    ``ssl.*``/``sasl.*`` option it cannot honour, SASL without a user name or password, or
    a certificate file that cannot be read.
    """
    options = {key: str(value) for key, value in settings.kafka_config().items()}
    protocol = options.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in _PROTOCOLS:
        raise UserError(f"kafka_client security.protocol {protocol!r} is not one of {', '.join(_PROTOCOLS)}",
                        hint=_HINT)
    unsupported = sorted(key for key in options
                         if key.startswith(("ssl.", "sasl.")) and key not in _UNDERSTOOD)
    if unsupported:
        raise UserError(f"the worker's Kafka client cannot honour kafka_client option(s) {', '.join(unsupported)}",
                        hint=f"use PEM files (ssl.ca.location, ssl.certificate.location, ssl.key.location); {_HINT}")
    context = _ssl_context(options) if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "SSL":
        return SSLCredentials(context)
    if protocol == "PLAINTEXT":
        return None
    mechanism = options.get("sasl.mechanism", options.get("sasl.mechanisms", "PLAIN")).upper()
    if mechanism not in _MECHANISMS:
        raise UserError(f"the worker's Kafka client does not support SASL mechanism {mechanism!r}",
                        hint=f"use one of {', '.join(_MECHANISMS)}; {_HINT}")
    username, password = options.get("sasl.username"), options.get("sasl.password")
    if not username or not password:
        raise UserError(f"security.protocol {protocol} needs a SASL user name and password",
                        hint="set SUPPORTLENS_KAFKA_SASL_USERNAME and SUPPORTLENS_KAFKA_SASL_PASSWORD")
    return SASLCredentials(username=username, password=password, ssl_context=context, mechanism=mechanism)


def _ssl_context(options: Mapping[str, str]) -> ssl.SSLContext:
    """TLS as librdkafka would do it with the same options: system CAs unless a CA file is given."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.get("ssl.ca.location"))
        if "ssl.certificate.location" in options:
            context.load_cert_chain(options["ssl.certificate.location"], options.get("ssl.key.location"),
                                    options.get("ssl.key.password"))
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the Kafka TLS files: {exc}",
                        hint="check ssl.ca.location, ssl.certificate.location and ssl.key.location") from None
    if options.get("ssl.endpoint.identification.algorithm", "https").lower() == "none":
        context.check_hostname = False
    if options.get("enable.ssl.certificate.verification", "true").lower() == "false":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
