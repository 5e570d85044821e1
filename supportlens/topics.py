"""The topics of the pipeline and their provisioning through confluent-kafka's AdminClient.

Topics whose records are joined share a key and must share their partition count
(co-partitioning): a request's client and server spans then meet in one worker.
Provisioning creates what is missing, brings retention and cleanup policy to the
declared values, and refuses to go on when a join group's partition counts differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from enum import Enum

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from supportlens.config import Settings
from supportlens.errors import UserError

DAY_MS = 86_400_000


class Join(str, Enum):
    """Co-partitioning groups: every topic of a group has the same key and partition count."""

    REQUEST_ID = "request_id"
    USER = "user"  # a user id, or ``account:<id>`` for an integration without users


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    retention_ms: int  # -1: keep forever
    compacted: bool = False
    join: Join | None = None
    purpose: str = ""
    partitions: int | None = None  # None: the configured partition count

    def partition_count(self, settings: Settings) -> int:
        return self.partitions or settings.partitions

    def configs(self) -> dict[str, str]:
        return {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": str(self.retention_ms),
        }


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("client-spans", "request_id", 3 * DAY_MS, join=Join.REQUEST_ID, purpose="spans from client apps"),
    TopicSpec("server-spans", "request_id", 3 * DAY_MS, join=Join.REQUEST_ID, purpose="spans from backend services"),
    TopicSpec("otlp-spans", "any (trace id or none)", 1 * DAY_MS,
              purpose="OTLP trace exports as the OTel Collector's kafka exporter writes them (otlp_proto or otlp_json)"),
    TopicSpec("fault-reports", "report_id", 30 * DAY_MS, purpose="one-click fault reports"),
    TopicSpec("behaviour", "user_id", 3 * DAY_MS, join=Join.USER, purpose="consent-gated behaviour events"),
    TopicSpec("user-steps", "user", 3 * DAY_MS, join=Join.USER,
              purpose="requests a sequence rule watches and diagnosed reports, re-keyed by user to meet "
                      "their behaviour in one worker (streams/sequences.py)"),
    TopicSpec("misuse-detections", "user", 30 * DAY_MS,
              purpose="catalogued misuse found in a user's sequence of requests and behaviour"),
    TopicSpec("requests", "request_id", 7 * DAY_MS, join=Join.REQUEST_ID, purpose="correlated requests"),
    TopicSpec(
        "reports-by-request", "request_id", 3 * DAY_MS, join=Join.REQUEST_ID,
        purpose="fault reports re-keyed by the request they name, to meet it in one worker",
    ),
    TopicSpec("reports-diagnosed", "report_id", 30 * DAY_MS, purpose="reports with diagnosis"),
    TopicSpec(
        "incident-signals", "source", 7 * DAY_MS, partitions=1,
        purpose="partial failure counts, worker clocks and people's declare/resolve commands, "
                "for the one surge detector and incident manager (one partition: one global view)",
    ),
    TopicSpec("surges", "dimension", 30 * DAY_MS, purpose="surge start/update/end"),
    TopicSpec("incidents", "incident_id", 365 * DAY_MS, purpose="incident lifecycle events"),
    TopicSpec("accounts", "account_id", -1, compacted=True, purpose="customer accounts (latest per key)"),
    TopicSpec("changes", "change_id", -1, compacted=True, partitions=1,
              purpose="deploys, config changes, feature flags, infrastructure changes (latest per change id)"),
    TopicSpec("notifications", "account_id", 30 * DAY_MS, purpose="outbox of customer notifications"),
    TopicSpec("deliveries", "notification_id", 30 * DAY_MS, purpose="every attempt to deliver a notification"),
    TopicSpec("dlq", "original key", 14 * DAY_MS, purpose="dead letters with reason and origin"),
)

TOPIC_NAMES = tuple(spec.name for spec in TOPICS)


@dataclass(frozen=True)
class TopicChange:
    topic: str
    action: str  # created | updated | unchanged
    detail: str = ""


class Admin(AdminClient):
    """An admin client that remembers why the broker refused it, if it did."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.refusals: list[str] = []
        super().__init__({**config, "error_cb": self._on_error})

    def _on_error(self, error: KafkaError) -> None:
        # librdkafka reports a refused login only here; the call that fails says "transport failure"
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self.refusals.append(error.str())


def admin_client(settings: Settings) -> Admin:
    return Admin(settings.kafka_config())


def check_reachable(admin: Admin, settings: Settings, timeout: float = 10.0) -> None:
    """Fail with a user-language error when no broker answers, or when it refuses our login."""
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0.5)  # error callbacks run only when polled
        if admin.refusals:
            user = settings.kafka_sasl_username or settings.kafka_client.get("sasl.username", "")
            raise UserError(
                f"Kafka at {settings.kafka_bootstrap} refused the login of user {user!r}: {admin.refusals[-1]}",
                hint="check SUPPORTLENS_KAFKA_SASL_USERNAME / SUPPORTLENS_KAFKA_SASL_PASSWORD and the sasl.* options",
            ) from None
        raise UserError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc.args[0].str() if exc.args else exc})",
            hint="start the local broker with `make kafka-start`, or set SUPPORTLENS_KAFKA_BOOTSTRAP",
        ) from None


def existing_partitions(admin: Admin, timeout: float = 10.0) -> dict[str, int]:
    metadata = admin.list_topics(timeout=timeout)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}


def require_topics(settings: Settings, names: tuple[str, ...]) -> None:
    """Fail early, in the user's words, when Kafka is down or a topic was never created."""
    admin = admin_client(settings)
    check_reachable(admin, settings)
    have = existing_partitions(admin)
    missing = [settings.topic(name) for name in names if settings.topic(name) not in have]
    if missing:
        raise UserError(f"missing topics: {', '.join(missing)}", hint="run `supportlens topics create` first")


def copartition_problems(settings: Settings, partitions: dict[str, int]) -> list[str]:
    """Join groups whose existing topics disagree on partition count (pure)."""
    problems = []
    for group in Join:
        counts = {
            settings.topic(spec.name): partitions[settings.topic(spec.name)]
            for spec in TOPICS
            if spec.join is group and settings.topic(spec.name) in partitions
        }
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name}={count}" for name, count in sorted(counts.items()))
            problems.append(f"topics joined by {group.value} must have equal partition counts, found {listed}")
    return problems


def provision(
    settings: Settings,
    admin: Admin | None = None,
    timeout: float = 30.0,
    on_change: Callable[[TopicChange], None] | None = None,
) -> list[TopicChange]:
    """Create missing topics and align configs; idempotent.

    Raises :class:`UserError` when Kafka is unreachable, when a join group is not
    co-partitioned, or when the broker refuses a topic (the broker's reason is kept).
    """
    admin = admin or admin_client(settings)
    check_reachable(admin, settings)
    have = existing_partitions(admin)
    changes: list[TopicChange] = []

    missing = [spec for spec in TOPICS if settings.topic(spec.name) not in have]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    settings.topic(spec.name),
                    num_partitions=spec.partition_count(settings),
                    replication_factor=settings.replication_factor,
                    config=spec.configs(),
                )
                for spec in missing
            ],
            request_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                error = exc.args[0]
                if error.name() != "TOPIC_ALREADY_EXISTS":  # a concurrent provisioner won the race
                    raise UserError(f"Kafka refused to create topic {name}: {error.str()}") from None
            spec = next(spec for spec in missing if settings.topic(spec.name) == name)
            changes.append(TopicChange(name, "created", f"{spec.partition_count(settings)} partitions"))
        _wait_for_leaders(admin, [settings.topic(spec.name) for spec in missing], timeout)
        have = existing_partitions(admin)

    problems = copartition_problems(settings, have)
    if problems:
        raise UserError(
            "; ".join(problems),
            hint="add partitions to the smaller topics with kafka-topics --alter, then restart the workers",
        )

    existing = [spec for spec in TOPICS if spec not in missing]
    changes.extend(_align_configs(admin, settings, existing, timeout))
    for change in changes:
        if on_change:
            on_change(change)
    return changes


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Return once every partition of ``names`` has a leader: created is not yet usable."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        waiting = [
            name
            for name in names
            if name not in topics
            or topics[name].error is not None
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise UserError(f"topics created but without a leader after {timeout:.0f} s: {', '.join(waiting)}")
        time.sleep(0.1)


def _align_configs(
    admin: AdminClient, settings: Settings, specs: list[TopicSpec], timeout: float
) -> list[TopicChange]:
    if not specs:
        return []
    resources = [ConfigResource(ResourceType.TOPIC, settings.topic(spec.name)) for spec in specs]
    described = admin.describe_configs(resources, request_timeout=timeout)
    current = {resource.name: future.result() for resource, future in described.items()}
    changes = []
    for spec in specs:
        name = settings.topic(spec.name)
        wrong = {k: v for k, v in spec.configs().items() if current[name].get(k) is None or current[name][k].value != v}
        if not wrong:
            changes.append(TopicChange(name, "unchanged"))
            continue
        resource = ConfigResource(
            ResourceType.TOPIC,
            name,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in wrong.items()
            ],
        )
        for future in admin.incremental_alter_configs([resource], request_timeout=timeout).values():
            future.result()
        changes.append(TopicChange(name, "updated", ", ".join(f"{k}={v}" for k, v in sorted(wrong.items()))))
    return changes
