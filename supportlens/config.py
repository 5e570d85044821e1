"""One frozen settings object, resolved once at the edge.

Precedence, highest first: CLI flags (passed as keyword arguments), environment
variables ``SUPPORTLENS_*``, files in a secrets directory (``SUPPORTLENS_SECRETS_DIR``,
one per setting), an optional TOML file (``--config`` or ``SUPPORTLENS_CONFIG``), then the
defaults below. Nothing else in the code base
reads the environment: everything receives a :class:`Settings`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from supportlens.errors import UserError
from supportlens.log_floods import KAFKA_CLIENT_LOG

SUPPORTED_LOCALES = ("en", "zh-CN")


# How long each table keeps rows, in days (0 = forever). Spans are the bulk and the
# least useful after a fortnight; reports and incidents are history support asks about.
DEFAULT_TTL_DAYS: dict[str, int] = {
    "spans": 14,
    "requests": 90,
    "fault_reports": 365,
    "report_diagnoses": 365,
    "behaviour": 30,
    "dead_letters": 14,
    "problem_trends": 400,
    "surges": 400,
    "incidents": 0,
    "changes": 0,
    "notifications": 400,
    "notification_deliveries": 400,
    "misuse_detections": 400,  # longer than the reports they explain
}


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "supportlens"


class Settings(BaseSettings):
    """Everything a supportlens process needs to know about its surroundings."""

    model_config = SettingsConfigDict(
        env_prefix="SUPPORTLENS_",
        frozen=True,
        extra="forbid",
        secrets_dir=None,
    )

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma separated."
    )
    kafka_client: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra librdkafka options passed to every client, e.g. "
            '{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", '
            '"ssl.ca.location": "/etc/ssl/ca.pem"}.'
        ),
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password; from the environment or a secrets file only."
    )
    topic_prefix: str = Field(
        default="supportlens.", description="Prefix of every topic name (namespaces a shared cluster)."
    )
    partitions: int = Field(default=6, ge=1, le=1024, description="Partitions per topic.")
    replication_factor: int = Field(default=1, ge=1, le=16, description="Replicas per topic.")
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where local state lives: the Kafka broker, the embedded ClickHouse store.",
    )
    clickhouse_dsn: str = Field(
        default="",
        description="ClickHouse DSN; empty means the embedded engine at chdb:///<state_dir>/clickhouse.",
    )
    clickhouse_database: str = Field(
        default="supportlens", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="ClickHouse database holding every supportlens table.",
    )
    clickhouse_password: SecretStr | None = Field(
        default=None, description="ClickHouse password (server DSN); from the environment or a secrets file only."
    )
    clickhouse_ca_cert: Path | None = Field(
        default=None, description="CA certificate (PEM) that signs the ClickHouse server's (an https:// DSN); "
        "default: the system's CAs.",
    )
    clickhouse_client_cert: Path | None = Field(
        default=None, description="Client certificate (PEM) for ClickHouse servers that require mutual TLS."
    )
    clickhouse_client_key: Path | None = Field(
        default=None, description="Key of clickhouse_client_cert (PEM), when it is not in the same file."
    )
    clickhouse_verify: bool = Field(
        default=True, description="Verify the ClickHouse server's certificate (turn off only for a test server)."
    )
    clickhouse_ttl_days: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_TTL_DAYS),
        description="Days each table keeps its rows (0 = forever), e.g. {\"spans\": 7}; unnamed tables keep their default.",
    )
    sink_batch_rows: int = Field(
        default=20_000, ge=1, description="Rows a sink batch collects per topic-partition before it is written."
    )
    sink_flush_s: float = Field(
        default=1.0, gt=0, description="Longest a record waits in a sink batch before the batch is written."
    )
    support_host: str = Field(default="127.0.0.1", description="Address the support lookup API listens on.")
    support_port: int = Field(default=8481, ge=1, le=65535, description="Port the support lookup API listens on.")
    support_url: str = Field(
        default="", description="Where the CLI reaches the support API; default http://support_host:support_port."
    )
    locales: tuple[str, ...] = Field(
        default=SUPPORTED_LOCALES, description="Locales users are answered in; the first is the fallback."
    )
    request_id_attributes: tuple[str, ...] = Field(
        default=("http.request_id", "x-request-id", "request_id", "http.request.header.x-request-id"),
        description="Span attributes that carry the request id, tried in order.",
    )
    request_id_from_trace_id: bool = Field(
        default=True, description="Use the trace id as request id when no attribute carries one."
    )
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(default=8480, ge=1, le=65535, description="Port the gateway listens on.")
    gateway_public_url: str = Field(
        default="", description="Base URL clients reach the gateway at (for status links); default http://host:port."
    )
    anonymize_client_ips: bool = Field(
        default=False, description="Keep only the network of client IPs (/24 for IPv4, /48 for IPv6)."
    )
    trusted_proxies: tuple[str, ...] = Field(
        default=(), description="Proxies whose X-Forwarded-For is believed (CIDRs); others' is ignored."
    )
    gateway_api_keys_file: Path | None = Field(
        default=None, description="TOML file of the client apps that may send to the gateway: the SHA-256 of each "
        "app's API keys (never a key) and optional rate limits. Unset: the gateway accepts any client (local use).",
    )
    gateway_rate_per_s: float = Field(
        default=200.0, ge=0, allow_inf_nan=False,
        description="Requests per second one client app may send to one gateway process "
        "(0: no limit), unless the keys file sets its own; applies only with gateway_api_keys_file.",
    )
    gateway_rate_burst: int = Field(
        default=1000, ge=1, description="Requests one client app may send at once before gateway_rate_per_s "
        "holds it back, unless the keys file sets its own.",
    )
    correlation_grace_s: float = Field(
        default=30.0, gt=0, description="How long a request waits for its missing side before it is emitted anyway."
    )
    correlation_settle_s: float = Field(
        default=2.0, ge=0, description="How long a request with both sides waits for straggling server spans."
    )
    worker_session_timeout_s: float = Field(
        default=60.0, gt=0, description="How long the worker group waits for a worker that stopped answering "
        "before its partitions move to the others (Kafka's session timeout).",
    )
    sink_session_timeout_s: float = Field(
        default=45.0, ge=6, description="How long the sink group waits for a sink that stopped answering "
        "before its partitions move to the others (librdkafka's session.timeout.ms; the broker allows 6 s and up).",
    )
    correlation_retain_s: float = Field(
        default=300.0, gt=0, description="How long an emitted request is kept to version late spans."
    )
    correlation_max_retained: int = Field(
        default=200_000, ge=0, description="At most this many emitted requests kept for late spans per worker "
        "(some 8 KB each in memory): the bound of the worker's memory at high span rates.",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address the worker and sink serve /metrics on.")
    surge_warmup_s: int = Field(
        default=900, ge=0, description="Event time the surge detector watches before any surge may start."
    )
    worker_metrics_port: int = Field(
        default=8482, ge=0, le=65535, description="Port of the worker's Prometheus /metrics (0: not served)."
    )
    sink_metrics_port: int = Field(
        default=8483, ge=0, le=65535,
        description="Port of a standalone sink's Prometheus /metrics (0: not served); under serve, the API serves it.",
    )
    status_page_url: str = Field(
        default="", description="Where customers follow an incident (named in VIP notifications)."
    )
    incident_policy: Path | None = Field(
        default=None, description="Declaration policy (TOML); default: the bundled streams/incident_policy.toml."
    )
    max_record_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest encoded record accepted on any topic."
    )
    grafana_url: str = Field(
        default="http://127.0.0.1:3000", description="Grafana that `supportlens dashboards push` provisions."
    )
    grafana_token: SecretStr | None = Field(
        default=None, description="Grafana service account token (role Admin: it writes datasources); "
        "from the environment or a secrets file only.",
    )
    grafana_user: str = Field(default="", description="Grafana user for basic auth, used when no token is set.")
    grafana_password: SecretStr | None = Field(
        default=None, description="Password of grafana_user; from the environment or a secrets file only."
    )
    grafana_clickhouse_dsn: str = Field(
        default="", description="ClickHouse as Grafana reaches it (http(s)://user:pass@host:port); "
        "default: clickhouse_dsn when that is a server.",
    )
    grafana_prometheus_url: str = Field(
        default="http://127.0.0.1:9090", description="Prometheus as Grafana reaches it."
    )
    notify_webhook_secret: SecretStr | None = Field(
        default=None, description="Key of the HMAC-SHA256 signature on every webhook (X-Supportlens-Signature); "
        "from the environment or a secrets file only. `supportlens notify` does not start without it.",
    )
    notify_max_attempts: int = Field(
        default=5, ge=1, le=100, description="Attempts to deliver a notification before it goes to the dead-letter topic."
    )
    notify_backoff_first_s: float = Field(
        default=2.0, gt=0, description="Longest wait before the first retry; it doubles with each retry (full jitter)."
    )
    notify_backoff_max_s: float = Field(default=300.0, gt=0, description="Longest wait between two attempts.")
    notify_max_per_account_per_hour: int = Field(
        default=10, ge=1, description="Notifications sent to one account in any hour; more are recorded as "
        "rate_limited and not sent.",
    )
    notify_timeout_s: float = Field(
        default=10.0, gt=0, description="Time a webhook receiver or SMTP server has to answer one attempt."
    )
    notify_senders: int = Field(default=4, ge=1, le=64, description="Notifications sent at the same time (threads).")
    notify_metrics_port: int = Field(
        default=8484, ge=0, le=65535, description="Port of `supportlens notify`'s Prometheus /metrics (0: not served)."
    )
    drill_webhook_url: str = Field(
        default="", pattern=r"^(https?://\S+)?$", description="Where drill notifications go, signed like any webhook; "
        "empty: drill notifications are sent nowhere (skipped_drill).",
    )
    report_recipients: list[str] = Field(
        default=[], description="E-mail addresses `supportlens report … --email` sends to (JSON list in the "
        "environment, e.g. '[\"support-leads@example.com\"]').",
    )
    smtp_host: str = Field(default="127.0.0.1", description="SMTP server that e-mail notifications are sent through.")
    smtp_port: int = Field(default=25, ge=1, le=65535, description="Port of the SMTP server.")
    smtp_from: str = Field(
        default="supportlens@localhost", pattern=r"^[^@\s]+@[^@\s]+$", description="Sender of e-mail notifications."
    )
    smtp_username: str = Field(default="", description="SMTP user name; empty: no login.")
    smtp_password: SecretStr | None = Field(
        default=None, description="SMTP password; from the environment or a secrets file only."
    )
    smtp_starttls: bool = Field(
        default=False, description="Upgrade SMTP connections with STARTTLS (required to log in to a server "
        "that is not on loopback).",
    )

    @field_validator("locales")
    @classmethod
    def _known_locales(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [loc for loc in value if loc not in SUPPORTED_LOCALES]
        if unknown or not value:
            raise ValueError(f"supported locales are {', '.join(SUPPORTED_LOCALES)}; got {list(value)}")
        return value

    @field_validator("clickhouse_ttl_days")
    @classmethod
    def _known_tables(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(DEFAULT_TTL_DAYS))
        if unknown:
            raise ValueError(f"no table named {', '.join(unknown)}; tables are {', '.join(DEFAULT_TTL_DAYS)}")
        if any(days < 0 for days in value.values()):
            raise ValueError("days must be 0 (forever) or more")
        return {**DEFAULT_TTL_DAYS, **value}

    @model_validator(mode="after")
    def _derive_defaults(self) -> "Settings":
        # frozen model: derived defaults are set once, here, before anyone sees the object
        if not self.clickhouse_dsn:
            object.__setattr__(self, "clickhouse_dsn", f"chdb://{self.state_dir / 'clickhouse'}")
        if not self.support_url:
            object.__setattr__(self, "support_url", f"http://{self.support_host}:{self.support_port}")
        return self

    @property
    def embedded_store(self) -> bool:
        """True when ClickHouse runs in-process (chDB): then one process at a time may open it."""
        return self.clickhouse_dsn.startswith("chdb:")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # TOML sits below the environment; its path (if any) comes from model_config.
        return (init_settings, env_settings, file_secret_settings, TomlConfigSettingsSource(settings_cls))

    def topic(self, name: str) -> str:
        """The full topic name for a logical topic (``client-spans`` → ``<prefix>client-spans``)."""
        return f"{self.topic_prefix}{name}"

    def kafka_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka configuration shared by every producer, consumer and admin client.

        Their log lines go to Python logging (delivered by the client's poll), quieted while
        a broker is away: see :mod:`supportlens.log_floods`."""
        config: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap, "logger": KAFKA_CLIENT_LOG,
                                  **self.kafka_client}
        if self.kafka_sasl_username is not None:
            config["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password is not None:
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        config.update(overrides)
        return config

    def producer_config(self, **overrides: Any) -> dict[str, Any]:
        """Producer settings: Kafka's Java partitioner, so a key lands on the same partition
        whoever produces it (Faust/aiokafka and the Java clients use murmur2; librdkafka's
        default is CRC32, which would split a request's spans across workers)."""
        return self.kafka_config(partitioner="murmur2_random", **overrides)

    def as_env(self) -> dict[str, str]:
        """The settings as ``SUPPORTLENS_*`` variables, so a child process resolves the same.

        Secrets are included: hand this only to child processes, never print it.
        """
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if isinstance(getattr(self, name), SecretStr):
                value = getattr(self, name).get_secret_value()
            if value is None:
                continue
            env[f"SUPPORTLENS_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        return env

    def secret_values(self) -> tuple[str, ...]:
        """Every secret these settings hold, for the log filter that keeps them out of any output."""
        values = [value.get_secret_value() for name in type(self).model_fields
                  if isinstance(value := getattr(self, name), SecretStr)]
        values += [str(self.kafka_client[key]) for key in ("sasl.password", "ssl.key.password", "sasl.oauthbearer.config")
                   if key in self.kafka_client]
        values += [match.group(1) for dsn in (self.clickhouse_dsn, self.grafana_clickhouse_dsn)
                   if (match := re.search(r"//[^:/@]+:([^@]+)@", dsn))]
        return tuple(sorted({value for value in values if value}, key=len, reverse=True))

    def public_view(self) -> dict[str, Any]:
        """The settings as a person may see them: secrets masked, also a password inside the DSN."""
        view = self.model_dump(mode="json")
        view["clickhouse_dsn"] = redact_dsn(self.clickhouse_dsn)
        view["grafana_clickhouse_dsn"] = redact_dsn(self.grafana_clickhouse_dsn)
        return view


def redact_dsn(dsn: str) -> str:
    """A DSN without its password, fit for logs, errors and screens."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", dsn)


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Resolve settings from flags, environment and an optional TOML file.

    ``flags`` whose value is ``None`` are ignored, so CLI options can be passed through
    unconditionally. A missing file or a bad value raises :class:`UserError` naming the setting.
    """
    env_path = os.environ.get("SUPPORTLENS_CONFIG")
    path = config_file or (Path(env_path) if env_path else None)
    sources = SettingsConfigDict()
    if path is not None:
        if not path.is_file():
            raise UserError(f"config file {path} does not exist", hint="check --config or SUPPORTLENS_CONFIG")
        sources["toml_file"] = path
    secrets_dir = os.environ.get("SUPPORTLENS_SECRETS_DIR")
    if secrets_dir:
        # one file per setting, named like its variable in lower case (supportlens_kafka_sasl_password),
        # as Docker and Kubernetes mount secrets
        if not Path(secrets_dir).is_dir():
            raise UserError(f"secrets directory {secrets_dir} does not exist", hint="check SUPPORTLENS_SECRETS_DIR")
        sources["secrets_dir"] = secrets_dir
    settings_cls: type[Settings] = Settings
    if sources:

        class FileSettings(Settings):
            model_config = sources

        settings_cls = FileSettings
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise UserError(
            f"invalid configuration: {problems}",
            hint="see README 'Configuration' for every setting and its SUPPORTLENS_* variable",
        ) from None
