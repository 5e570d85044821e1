"""Correlation throughput on real Kafka: the worker beside a raw consume-and-decode loop.

Both read the same backlog of simulated spans in the same run:
- baseline: one confluent-kafka consumer reading both span topics and decoding every
  record into a typed Span (msgspec), nothing else;
- worker: a real ``supportlens worker`` process (one Python process = one core at most)
  started on the backlog; its rate is spans consumed and committed per second, read
  from its consumer group's committed offsets.

Usage: python bench/correlation.py [--rate 1500] [--duration 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from supportlens.config import Settings, load_settings
from supportlens.contracts import Span, decode
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topic_reader import end_offsets
from supportlens.topics import provision

SPAN_TOPICS = ("client-spans", "server-spans")


def baseline(settings: Settings, ends: dict[tuple[str, int], int]) -> tuple[int, float]:
    """Spans read and decoded per second by a bare confluent-kafka loop."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"bench-{uuid.uuid4()}", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(t, p, 0) for (t, p) in ends])
    total = sum(ends.values())
    count = 0
    started = time.perf_counter()
    while count < total:
        for message in consumer.consume(num_messages=10_000, timeout=1.0):
            if message.error() is None:
                decode(message.value(), Span)
                count += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return count, elapsed


def committed(admin: AdminClient, group: str, partitions: list[TopicPartition]) -> int:
    request = [ConsumerGroupTopicPartitions(group, partitions)]
    result = admin.list_consumer_group_offsets(request)[group].result()
    return sum(max(tp.offset, 0) for tp in result.topic_partitions)


def worker_rate(settings: Settings, ends: dict[tuple[str, int], int], log: Path) -> tuple[int, float]:
    """Spans per second a real worker consumes (and commits) while draining the backlog."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")} | settings.as_env()
    env |= {"SUPPORTLENS_CORRELATION_GRACE_S": "5", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "supportlens", "worker", "--loglevel", "warning"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    admin = AdminClient(settings.kafka_config())
    group = f"{settings.topic_prefix}worker"
    partitions = [TopicPartition(t, p) for (t, p) in ends]
    total = sum(ends.values())
    try:
        # the clock starts at the first commit: group join and table recovery are start-up, not throughput
        first = last = 0
        started = 0.0
        while last < total:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited: see {log}")
            last = committed(admin, group, partitions)
            if last and not started:
                started, first = time.perf_counter(), last
            time.sleep(0.2)
        return last - first, time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1500)
    parser.add_argument("--duration", type=int, default=40)
    args = parser.parse_args()
    settings = load_settings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}.", partitions=3)
    provision(settings)
    out = Path("out/bench")
    out.mkdir(parents=True, exist_ok=True)
    print(f"simulating {args.duration} s at {args.rate:g} requests/s (peak) into {settings.kafka_bootstrap} …", flush=True)
    run = simulate(settings, SimulateOptions("service-outage", args.rate, args.duration, speed=0,
                                             labels_path=out / "labels.jsonl"))
    ends = end_offsets(settings, [settings.topic(t) for t in SPAN_TOPICS])
    spans = sum(ends.values())
    print(f"backlog: {spans:,} spans of {run.requests:,} requests", flush=True)

    raw_count, raw_s = baseline(settings, ends)
    worker_count, worker_s = worker_rate(settings, ends, out / "worker.log")
    raw_rate = raw_count / raw_s
    rate = worker_count / worker_s
    print()
    print(f"{'loop':<48} {'spans':>10} {'seconds':>8} {'spans/s':>10}")
    print(f"{'raw confluent-kafka consume + msgspec decode':<48} {raw_count:>10,} {raw_s:>8.2f} {raw_rate:>10,.0f}")
    print(f"{'supportlens worker (Faust, 1 process)':<48} {worker_count:>10,} {worker_s:>8.2f} {rate:>10,.0f}")
    print(f"worker / raw: {rate / raw_rate:.1%}   (goals: >= 60,000 spans/s per core, >= 50% of raw)")
    print(f"machine: {os.cpu_count()} cores; the worker is one Python process")


if __name__ == "__main__":
    main()
