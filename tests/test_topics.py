"""Topic provisioning on the real broker: created, idempotent, configs aligned, co-partitioning enforced."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from supportlens.errors import UserError
from supportlens.topics import TOPICS, provision

pytestmark = pytest.mark.kafka


def _configs(admin: AdminClient, topic: str) -> dict[str, str]:
    (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {k: v.value for k, v in future.result().items()}


def test_every_topic_is_created_with_its_partitions_and_policy(settings):
    changes = provision(settings)
    assert {c.topic for c in changes if c.action == "created"} == {settings.topic(s.name) for s in TOPICS}
    admin = AdminClient(settings.kafka_config())
    metadata = admin.list_topics(timeout=10).topics
    for spec in TOPICS:
        assert len(metadata[settings.topic(spec.name)].partitions) == spec.partition_count(settings)
    accounts = _configs(admin, settings.topic("accounts"))
    assert accounts["cleanup.policy"] == "compact"
    spans = _configs(admin, settings.topic("client-spans"))
    assert (spans["cleanup.policy"], spans["retention.ms"]) == ("delete", str(3 * 86_400_000))


def test_provisioning_twice_changes_nothing_and_repairs_drift(settings):
    provision(settings)
    assert {c.action for c in provision(settings)} == {"unchanged"}
    admin = AdminClient(settings.kafka_config())
    topic = settings.topic("fault-reports")
    drift = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([drift]).values():
        future.result()
    deadline = time.monotonic() + 10
    while _configs(admin, topic)["retention.ms"] != "1000":  # Kafka applies config changes asynchronously
        assert time.monotonic() < deadline
        time.sleep(0.1)
    changes = {c.topic: c for c in provision(settings)}
    assert changes[topic].action == "updated"
    assert changes[topic].detail == f"retention.ms={30 * 86_400_000}"
    assert _configs(admin, topic)["retention.ms"] == str(30 * 86_400_000)


def test_joined_topics_with_different_partition_counts_are_refused(settings):
    admin = AdminClient(settings.kafka_config())
    (future,) = admin.create_topics([NewTopic(settings.topic("server-spans"), num_partitions=1, replication_factor=1)]).values()
    future.result()
    with pytest.raises(UserError) as caught:
        provision(settings)
    assert "topics joined by request_id must have equal partition counts" in caught.value.message
    assert f"{settings.topic('server-spans')}=1" in caught.value.message
    assert f"{settings.topic('client-spans')}=3" in caught.value.message
