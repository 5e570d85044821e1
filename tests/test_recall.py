"""Reading back what a partition emitted before this worker got it (streams.recall)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from supportlens.config import Settings
from supportlens.contracts import CorrelatedRequest, Diagnosis, encode
from supportlens.topics import provision
from streams.recall import Recalled, read_emitted


def _request(request_id: str, version: int, cls: str = "ok") -> bytes:
    return encode(CorrelatedRequest(request_id=request_id, version=version, start_us=1, diagnosis=Diagnosis(cls=cls)))


def test_the_highest_version_wins_whatever_the_order_and_the_oldest_go_beyond_the_limit():
    recalled = Recalled(limit=2)
    recalled.add(b"r1", _request("r1", 5, "server_error"))
    recalled.add(b"r1", _request("r1", 3, "ok"))  # a copy of an older version, written later
    recalled.add(b"r1", b"not json")  # never a reason to forget what was read
    got = recalled.get(b"r1")
    assert got is not None and got.version == 5 and got.diagnosis.cls == "server_error"
    recalled.add(b"r2", _request("r2", 1))
    recalled.add(b"r3", _request("r3", 1))
    assert len(recalled) == 2 and recalled.get(b"r1") is None and recalled.get(b"r3") is not None
    assert recalled.get(b"unknown") is None


@pytest.mark.kafka
def test_a_partition_is_read_back_from_the_first_record_of_the_window_to_its_end(settings: Settings):
    provision(settings)
    topic = settings.topic("requests")
    producer = Producer(settings.producer_config())
    old_ms = int((time.time() - 3600) * 1000)
    producer.produce(topic, key=b"old", value=_request("old", 1), partition=0, timestamp=old_ms)
    for i in range(50):
        producer.produce(topic, key=f"r{i}".encode(), value=_request(f"r{i}", 1), partition=0)
    producer.produce(topic, key=b"r7", value=_request("r7", 9, "server_error"), partition=0)
    producer.produce(topic, key=b"elsewhere", value=_request("elsewhere", 1), partition=1)
    assert producer.flush(30) == 0

    recalled = read_emitted(settings, 0, since_ms=int((time.time() - 600) * 1000), limit=1000)
    assert len(recalled) == 50
    assert recalled.get(b"old") is None and recalled.get(b"elsewhere") is None
    r7 = recalled.get(b"r7")
    assert r7 is not None and r7.version == 9 and r7.diagnosis.cls == "server_error"
    assert len(read_emitted(settings, 2, since_ms=0, limit=1000)) == 0  # an empty partition
    assert len(read_emitted(settings, 0, since_ms=int((time.time() + 600) * 1000), limit=1000)) == 0
