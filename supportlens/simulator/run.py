"""Run a simulation into Kafka: idempotent producer, wall-clock pacing, progress, labels file."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

from supportlens.bulk_producer import BulkProducer
from supportlens.config import Settings
from supportlens.contracts import Span, encode
from supportlens.errors import UserError
from supportlens.span_batches import pack_spans
from supportlens.topics import require_topics
from supportlens.simulator.generate import SECOND_US, Emit, Plan, Simulation
from supportlens.simulator.labels import RunLabel, encode_label
from supportlens.simulator.scenarios import scenario as find_scenario
from supportlens.simulator.world import build_world, with_vip_webhooks


@dataclass(frozen=True)
class SimulateOptions:
    scenario: str
    rate: float
    duration_s: int
    seed: int = 7
    users: int = 5000
    speed: float = 1.0  # simulated seconds per wall second; 0 = as fast as possible
    start: datetime | None = None
    labels_path: Path = Path("labels.jsonl")
    batch: bool = True  # spans in batch records per partition; False: one span a record, the older format
    vip_webhooks: str = ""  # set: every VIP account takes webhooks at <vip_webhooks>/<account id>


class Outgoing(NamedTuple):
    """One record to produce; ``topic`` is the logical name."""

    topic: str
    key: str
    value: bytes
    ts_us: int
    partition: int | None = None  # None: the producer's partitioner (murmur2 of the key)


def tick_records(events: Sequence[Emit], partitions: int, batch: bool = True,
                 max_record_bytes: int = 1_048_576) -> list[Outgoing]:
    """The records of one simulated second (pure).

    With ``batch`` the spans go first, packed into one record per topic and destination
    partition (``supportlens.span_batches``), stamped with the latest of their start times;
    the other records follow in event-time order — so a report never reaches Kafka before
    spans of its own second. Without it every emit is a record of its own, in order.
    """
    if not batch:
        return [Outgoing(e.topic, e.key, encode(e.record), e.ts_us) for e in events]
    spans = [(e.topic, e.record) for e in events if isinstance(e.record, Span)]
    out = [Outgoing(topic, b.key, b.value, b.latest_us, b.partition)
           for topic, b in pack_spans(spans, partitions, max_record_bytes)]
    out += [Outgoing(e.topic, e.key, encode(e.record), e.ts_us) for e in events if not isinstance(e.record, Span)]
    return out


def send_records(producer: BulkProducer, settings: Settings, records: Sequence[Outgoing]) -> None:
    for r in records:
        producer.send(settings.topic(r.topic), r.key, r.value, r.ts_us, r.partition)


def plan_for(options: SimulateOptions) -> Plan:
    """The plan of a run; raises :class:`UserError` for options a person got wrong."""
    try:
        scenario = find_scenario(options.scenario)
    except KeyError as exc:
        raise UserError(str(exc.args[0]), hint="`supportlens simulate --help` lists the scenarios") from None
    if options.rate <= 0:
        raise UserError(f"--rate must be above 0, got {options.rate}")
    if options.duration_s <= 0:
        raise UserError(f"--duration must be at least 1 second, got {options.duration_s}")
    if options.users < 20:
        raise UserError(f"--users must be at least 20, got {options.users}")
    if options.speed < 0:
        raise UserError(f"--speed must be 0 (as fast as possible) or above, got {options.speed}")
    start = options.start or datetime.now(timezone.utc)
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    if scenario.start_hour_utc is not None and options.start is None:
        # the most recent such hour, so a quiet night is always in the past, never in the future
        candidate = start.replace(hour=scenario.start_hour_utc, minute=0, second=0, microsecond=0)
        start = candidate if candidate <= start else candidate - timedelta(days=1)
    return Plan(scenario, options.rate, options.duration_s, options.seed, int(start.timestamp() * SECOND_US))


def simulate(
    settings: Settings,
    options: SimulateOptions,
    progress: Callable[[int, int, int], None] | None = None,
) -> RunLabel:
    """Produce a whole run to Kafka and write its labels; returns the run summary.

    ``progress(seconds_done, seconds_total, records_sent)`` is called once per simulated
    second (with ``options.batch`` a record carries many spans). Raises :class:`UserError` when Kafka refuses records: the labels file then
    says so instead of pretending the run is complete.
    """
    plan = plan_for(options)
    topics = ("accounts", "client-spans", "server-spans", "fault-reports", "behaviour")
    if plan.change_posts():
        topics += ("changes",)  # only scenarios with changes need it: older brokers run the others
    require_topics(settings, topics)
    world = build_world(options.seed, options.users)
    if options.vip_webhooks:
        world = with_vip_webhooks(world, options.vip_webhooks)
    sim = Simulation(plan, world)
    producer = BulkProducer(settings)

    options.labels_path.parent.mkdir(parents=True, exist_ok=True)
    sent = 0
    wall_start = time.monotonic()
    with options.labels_path.open("wb") as labels:
        accounts = tick_records(sim.accounts(), settings.partitions, batch=False)
        send_records(producer, settings, accounts)
        sent += len(accounts)
        for tick in sim.ticks():
            records = tick_records(tick.events, settings.partitions, options.batch, settings.max_record_bytes)
            send_records(producer, settings, records)
            sent += len(records)
            labels.write(b"".join(encode_label(label) for label in tick.labels))
            producer.poll()
            if options.speed > 0:
                due = wall_start + (tick.second + 1) / options.speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if progress:
                progress(min(tick.second + 1, plan.duration_s), plan.duration_s, sent)
            if producer.failed:
                break
        producer.finish("the run is incomplete", hint=f"check the broker at {settings.kafka_bootstrap} and that "
                                                       "topics exist (`supportlens topics create`)")
        summary = sim.summary()
        labels.write(encode_label(summary))
    return summary
