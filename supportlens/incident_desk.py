"""What people do with incidents: list them, declare one, resolve one.

The incident manager (the worker's ``detect`` agent) is the only writer of ``incidents``:
a person's decision travels to it as an :class:`IncidentCommand` on ``incident-signals``,
in order with the surges it weighs, and the command waits for the manager's answer on
``incidents``. Listing reads ``incidents`` itself, so it works without ClickHouse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec
from confluent_kafka import Consumer, Producer, TopicPartition

from supportlens.config import Settings
from supportlens.contracts import IncidentCommand, IncidentEvent, InvalidRecord, decode, encode
from supportlens.errors import UserError
from supportlens.topic_reader import end_offsets, read_range
from supportlens.topics import require_topics

ANSWER_TIMEOUT_S = 30.0


def current_incidents(events: Iterable[IncidentEvent]) -> list[IncidentEvent]:
    """The latest transition of every incident, newest first (pure)."""
    latest: dict[str, IncidentEvent] = {}
    for event in events:
        known = latest.get(event.incident_id)
        if known is None or event.sequence >= known.sequence:
            latest[event.incident_id] = event
    return sorted(latest.values(), key=lambda e: e.at_us, reverse=True)


def read_incidents(settings: Settings) -> list[IncidentEvent]:
    """Every incident event on the topic (records that do not decode are skipped: the sink dead-letters them)."""
    require_topics(settings, ("incidents",))
    events = []
    for message in read_range(settings, [settings.topic("incidents")]):
        try:
            events.append(decode(message.value() or b"", IncidentEvent, settings.max_record_bytes))
        except InvalidRecord:
            continue
    return events


def send_and_wait(settings: Settings, command: IncidentCommand,
                  answers: Callable[[IncidentEvent], bool], timeout: float = ANSWER_TIMEOUT_S) -> IncidentEvent:
    """Send ``command`` to the incident manager and return its answer on ``incidents``.

    Raises :class:`UserError` when no worker answers within ``timeout``.
    """
    require_topics(settings, ("incident-signals", "incidents"))
    topic = settings.topic("incidents")
    start = end_offsets(settings, [topic])
    consumer = Consumer(settings.kafka_config(**{"group.id": "supportlens-desk", "enable.auto.commit": False}))
    try:
        consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in start.items()])
        producer = Producer(settings.producer_config())
        producer.produce(settings.topic("incident-signals"), key=b"desk", value=encode(command))
        if producer.flush(10):
            raise UserError(f"Kafka at {settings.kafka_bootstrap} did not take the command",
                            hint="check the broker (`deploy/local/kafka.sh status`)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None:
                    continue
                try:
                    event = decode(message.value() or b"", IncidentEvent, settings.max_record_bytes)
                except InvalidRecord:
                    continue
                if answers(event):
                    return event
    finally:
        consumer.close()
    raise UserError(f"the command was sent, but no incident manager answered within {timeout:.0f} s",
                    hint="is `supportlens worker` (or `supportlens serve`) running on this topic prefix? "
                         "It applies the command when it starts.")


def declare(settings: Settings, *, title: str, dimensions: dict[str, str], by: str, reason: str,
            severity: str | None, now_us: int) -> IncidentEvent:
    if not dimensions:
        raise UserError("say what is affected", hint="e.g. --service payment, or --region cn-east --network 'China Telecom'")
    try:
        command = msgspec.convert({"action": "declare", "at_us": now_us, "by": by, "reason": reason, "title": title,
                                   "dimensions": dimensions, "severity": severity}, IncidentCommand)
    except msgspec.ValidationError as exc:
        raise UserError(f"cannot declare: {exc}", hint="severity is sev1 … sev4; names and titles must be short") from None
    return send_and_wait(settings, command, lambda e: e.transition == "declared" and e.declared_by == by
                         and e.started_at_us >= now_us and e.dimensions == dimensions)


def resolve(settings: Settings, incident_id: str, *, by: str, reason: str, now_us: int) -> IncidentEvent:
    known = {e.incident_id: e for e in current_incidents(read_incidents(settings))}
    incident = known.get(incident_id)
    if incident is None:
        raise UserError(f"no incident {incident_id!r}", hint="`supportlens incidents` lists them")
    if incident.transition == "resolved":
        raise UserError(f"incident {incident_id} is already resolved ({incident.reason})")
    command = IncidentCommand(action="resolve", at_us=now_us, by=by, reason=reason, incident_id=incident_id)
    return send_and_wait(settings, command, lambda e: e.incident_id == incident_id and e.transition == "resolved")
