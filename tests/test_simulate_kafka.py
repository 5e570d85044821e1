"""The simulator through real Kafka: what the labels say was sent is exactly what is read back."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
from confluent_kafka import Producer

from helpers import settings_env, supportlens_cmd
from sinks.run_summary import RECORD_TYPES, compare, observe
from supportlens.simulator.generate import SECOND_US, seasonal_factor
from supportlens.simulator.labels import ReportLabel, RequestLabel, read_labels, read_run
from supportlens.contracts import Change, decode
from supportlens.simulator.world import build_world
from supportlens.span_batches import decode_spans
from supportlens.topic_reader import end_offsets, read_range
from supportlens.topics import provision

pytestmark = pytest.mark.kafka


def _read_back(settings, start=None, max_bytes=1_048_576):
    topics = [settings.topic(name) for name in RECORD_TYPES]
    logical = {settings.topic(name): name for name in RECORD_TYPES}
    return observe(((logical[m.topic()], m.value()) for m in read_range(settings, start or topics)), max_bytes)


def test_simulate_cli_service_outage_sends_exactly_what_its_labels_count(settings, tmp_path):
    """Acceptance: `supportlens simulate --scenario service-outage --rate 2000 --duration 30`."""
    env = settings_env(settings)
    subprocess.run(supportlens_cmd("topics", "create"), env=env, check=True, capture_output=True)
    labels = tmp_path / "outage.jsonl"
    done = subprocess.run(
        supportlens_cmd("simulate", "--scenario", "service-outage", "--rate", "2000", "--duration", "30",
                        "--labels", str(labels)),
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    run = read_run(labels)
    lines = list(read_labels(labels))
    requests = [label for label in lines if isinstance(label, RequestLabel)]
    reports = [label for label in lines if isinstance(label, ReportLabel)]
    # the labels agree with themselves ...
    assert run.requests == len(requests)
    assert run.counts["client-spans"] == sum(r.client_span_emitted for r in requests)
    assert run.counts["server-spans"] == sum(r.server_spans for r in requests)
    assert run.counts["fault-reports"] == len(reports) > 0
    assert run.counts["accounts"] == len(build_world(run.seed, run.users).accounts)
    # ... the volume is what --rate asks for at this time of day (±5 sigma of the Poisson draws) ...
    world = build_world(run.seed, run.users)
    expected = 0.0
    for second in range(30):
        hour = ((run.start_us + second * SECOND_US) / 3_600_000_000) % 24
        expected += sum(2000 / len(world.users) * seasonal_factor(hour, u.region.utc_offset_h) for u in world.users)
    assert abs(run.requests - expected) < 5 * expected**0.5 + 10
    # ... and Kafka holds exactly that, every record intact
    seen = _read_back(settings)
    assert not seen.invalid
    for row in compare(run, seen):
        assert row.ok, f"{row.topic}: sent {row.expected}, read back {row.seen}"
    assert seen.server_errors_by_service.most_common(1)[0][0] == "payment"
    assert len(seen.reporting_users) == len({r.user_id for r in reports})
    assert Counter(r.expected_class for r in reports).most_common(1)[0][0] == "server_error"


def test_simulate_cli_bad_deploy_sends_its_changes_and_exactly_what_its_labels_count(settings, tmp_path):
    """`supportlens simulate --scenario bad-deploy`: the `changes` topic holds the deploy (posted
    at its start and again at 100 %) and the earlier config change, as the labels count them."""
    env = settings_env(settings)
    subprocess.run(supportlens_cmd("topics", "create"), env=env, check=True, capture_output=True)
    labels = tmp_path / "bad-deploy.jsonl"
    done = subprocess.run(
        supportlens_cmd("simulate", "--scenario", "bad-deploy", "--rate", "100", "--duration", "60", "--speed", "0",
                        "--labels", str(labels)),
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert settings.topic("changes") in done.stdout  # the summary table counts it like the other topics
    run = read_run(labels)
    assert run.rollout is not None and run.counts["changes"] == sum(c.records for c in run.changes) == 3

    seen = _read_back(settings)
    assert not seen.invalid
    for row in compare(run, seen):
        assert row.ok, f"{row.topic}: sent {row.expected}, read back {row.seen}"
    messages = list(read_range(settings, [settings.topic("changes")]))
    assert len(messages) == run.counts["changes"]
    changes = [decode(m.value(), Change) for m in messages]
    for message, change in zip(messages, changes):
        assert message.key().decode() == change.change_id
        assert message.timestamp()[1] == change.started_at_us // 1000
    assert {c.change_id for c in changes} == {c.change_id for c in run.changes}
    latest = {c.change_id: c for c in changes}  # a compacted topic: the last post of an id counts
    deploy = latest[run.rollout.change_id]
    assert (deploy.kind, deploy.service, deploy.version, deploy.from_version) == ("deploy", "payment", "1.4.2", "1.4.1")
    assert (deploy.started_at_us, deploy.finished_at_us) == (run.rollout.steps[0].at_us, run.rollout.steps[-1].at_us)
    assert run.expected_incidents[0].expected_suspect == deploy.change_id
    # the payment hop's spans say which version served them, and the new one fails
    versions: Counter[tuple[str, int | None]] = Counter()
    for message in read_range(settings, [settings.topic("server-spans")]):
        for span in decode_spans(message.value()).spans:
            if span.service == "payment":
                versions[(str(span.attributes["service.version"]), span.http_status)] += 1
    failed_new = versions[("1.4.2", 503)]
    assert failed_new > 10 * max(1, versions[("1.4.1", 503)])
    assert failed_new > 0.8 * sum(n for (version, _), n in versions.items() if version == "1.4.2")


def test_malformed_records_on_a_topic_are_counted_with_a_reason_naming_the_field(settings):
    provision(settings)
    before = end_offsets(settings, [settings.topic(name) for name in RECORD_TYPES])
    producer = Producer(settings.kafka_config())
    topic = settings.topic("client-spans")
    for value in (b"{broken", b'{"side":"client","service":"app","start_us":1,"duration_us":1,"status":"ok"}',
                  b'{"request_id":"r","side":"client","service":"app","start_us":"now","duration_us":1,"status":"ok"}',
                  b'{"request_id":"r","side":"client","service":"app","start_us":1,"duration_us":1,"status":"ok"}'):
        producer.produce(topic, value=value, key=b"r")
    producer.produce(settings.topic("fault-reports"), value=b"x" * 200_000, key=b"big")
    assert producer.flush(30) == 0
    seen = _read_back(settings, before, max_bytes=100_000)
    assert seen.records["client-spans"] == 1  # the good record is not lost among the bad
    reasons = sorted(seen.invalid)
    assert any("client-spans: not valid JSON" in r for r in reasons)
    assert any("missing required field `request_id`" in r for r in reasons)
    assert any("field `start_us`: expected `int`, got `str`" in r for r in reasons)
    assert any("fault-reports: record is 200,000 bytes, over the 100,000-byte limit" in r for r in reasons)


def test_a_key_lands_on_the_partition_kafkas_java_partitioner_picks(settings, tmp_path):
    """Co-partitioning across producers: librdkafka must agree with Faust/aiokafka (murmur2)."""
    from aiokafka.partitioner import DefaultPartitioner

    from supportlens.simulator.run import SimulateOptions, simulate
    from supportlens.span_batches import decode_spans

    provision(settings)
    simulate(settings, SimulateOptions("normal", 20, 3, speed=0, labels_path=tmp_path / "l.jsonl"))
    java = DefaultPartitioner()
    topic = settings.topic("server-spans")
    partitions = list(range(settings.partitions))
    checked = 0
    for message in read_range(settings, [topic]):  # batch records: every span's request id, not just the key
        assert message.partition() == java(message.key(), partitions, partitions)
        for span in decode_spans(message.value()).spans:
            assert message.partition() == java(span.request_id.encode(), partitions, partitions), span.request_id
            checked += 1
    assert checked > 50
