"""The broker under the tests is a real Apache Kafka process, not a stand-in."""

from __future__ import annotations

import subprocess

import pytest
from confluent_kafka.admin import AdminClient

pytestmark = pytest.mark.kafka


def test_the_test_broker_is_a_real_kafka(kafka):
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    cluster = admin.describe_cluster(request_timeout=10).result()
    assert len(cluster.nodes) >= 1
    if kafka.how == "local-jars":
        pid = (kafka.state_dir / "kafka" / "kafka.pid").read_text().strip()
        command = subprocess.run(["ps", "-ww", "-o", "args=", "-p", pid], capture_output=True, text=True).stdout
        assert command.split()[0].endswith("java")
        assert "kafka.Kafka" in command.split()
