"""The worker's sequence agent: one user's requests, behaviour and reports meet (``streams.sequences``).

    client/server spans of watched operations ──(correlate)──▶ user-steps ─┐
    diagnosed reports a rule could explain ───(correlate)──▶ user-steps ─┼─▶ sequences ─▶ misuse-detections
    behaviour (consented, keyed by user) ─────────────────────────────────┘      ├──▶ reports-diagnosed (traced)
                                                                                  └──▶ incident-signals (misuse counts)

``user-steps`` and ``behaviour`` are co-partitioned by user (murmur2 of the same key): one
worker sees all of a user's steps, and keeps their state in a changelog-backed table — a
restarted worker recovers it. Only the operations a rule names travel here, and only the
reports a rule could explain, so the agent's load is a sliver of the span rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import TP

from supportlens.config import Settings
from supportlens.contracts import (
    BehaviourEvent, InvalidRecord, MisuseCount, ReportStep, SequenceStep, decode, decode_user_step, encode, is_drill,
)
from supportlens.metrics import Metrics
from supportlens.span_batches import partition_of
from streams.catalog import Catalog
from streams import sequences
from streams.sequences import Found, UserState

log = logging.getLogger(__name__)
DUE_EVERY_S = 1.0


def install(app: faust.App, settings: Settings, catalog: Catalog, metrics: Metrics, name: dict[str, str],
            progress: Callable[[Any, float], None], dead_letter: Callable[[Any, str], Awaitable[None]],
            signals: Any, source: str) -> None:
    """Add the sequence agent, its table and its timer to ``app`` (nothing when no rule exists)."""
    if not catalog.sequences:
        return
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    steps_in = app.topic(name["behaviour"], name["user-steps"], **raw)
    detections_out = app.topic(name["misuse-detections"], **raw)
    diagnosed_out = app.topic(name["reports-diagnosed"], **raw)
    table = app.Table("sequences", partitions=settings.partitions, use_partitioner=True, key_type=bytes,
                      value_type=bytes)
    watched_names, _ = sequences.watched(catalog)
    behaviour_topic = name["behaviour"]
    due: dict[bytes, float] = {}  # users with requests waiting for a late precursor → when

    def step_of(event: faust.types.EventT) -> SequenceStep | ReportStep | None:
        value = event.value or b""
        if event.message.topic == behaviour_topic:
            b = decode(value, BehaviourEvent, settings.max_record_bytes)
            if b.name not in watched_names and b.name != sequences.WITHDRAWN:
                return None  # behaviour no rule reads: not even loaded
            return SequenceStep(user_id=b.user_id, account_id=b.account_id, ts_us=b.ts_us, name=b.name,
                                session_id=str(b.attributes.get("session_id", "")), behaviour=True,
                                drill=is_drill(b.attributes))
        return decode_user_step(value, settings.max_record_bytes)

    def load(key: bytes) -> UserState:
        return sequences.unpack(table.get(key))

    def store(key: bytes, state: UserState) -> None:
        if sequences.is_idle(state):
            if key in table:
                del table[key]
        else:
            table[key] = sequences.pack(state)
        when = sequences.pending_due(state)
        if when is None:
            due.pop(key, None)
        else:
            due[key] = when

    def publish(key: bytes, found: Found) -> None:
        for detection in found.detections:
            detections_out.send_soon(key=key, value=encode(detection))
            metrics.events_out.labels("misuse-detections").inc()
            metrics.misuse_detections.labels(detection.code, str(detection.drill).lower()).inc()
            log.info("misuse: %s by %s: %s", detection.code, key.decode(errors="replace"), detection.evidence)
            if detection.account_id:
                # it counts as the catalogued misuse: towards a VIP's best-practice advice too
                signals.send_soon(key=source.encode(), value=encode(MisuseCount(
                    source=source, account_id=detection.account_id, code=detection.code, at_us=detection.at_us,
                    count=1, drill=detection.drill)))
        for report in found.reports:
            diagnosed_out.send_soon(key=report.report_id.encode(), value=encode(report))
            metrics.events_out.labels("reports-diagnosed").inc()
            metrics.reports_traced.labels(report.diagnosis.code, report.diagnosis.surfaced_as).inc()

    @app.agent(steps_in)
    async def sequence(stream: faust.StreamT) -> None:
        """Each user's steps in order of arrival; a detection or a traced report as they come."""
        async for event in stream.events():
            now = time.time()
            topic = "behaviour" if event.message.topic == behaviour_topic else "user-steps"
            metrics.events_in.labels(topic).inc()
            progress(event, now)
            if event.value is None or event.key is None:
                continue  # a tombstone, or a behaviour record nobody keyed (the gateway keys every one)
            try:
                step = step_of(event)
            except InvalidRecord as exc:
                if topic == "user-steps":  # behaviour's own dead letters are the sink's to write
                    await dead_letter(event, exc.reason)
                continue
            if step is None:
                continue
            key = event.key
            state = load(key)
            if isinstance(step, ReportStep):
                found = sequences.on_report(state, step.report, catalog, int(now * 1_000_000))
            else:
                found = sequences.on_step(state, step, catalog, now)
            store(key, state)
            publish(key, found)

    @app.timer(DUE_EVERY_S)
    async def judge_due() -> None:
        """Requests whose precursor had its grace to arrive are judged now."""
        now = time.time()
        for key in [k for k, when in due.items() if when <= now]:
            state = load(key)
            found = sequences.on_due(state, catalog, now)
            store(key, state)
            publish(key, found)

    @table.on_recover
    async def find_waiting() -> None:
        due.clear()
        for key, value in table.items():
            when = sequences.pending_due(sequences.unpack(value))
            if when is not None:
                due[key] = when

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        lost = {tp.partition for tp in revoked if tp.topic == name["user-steps"]}
        for key in [k for k in due if partition_of(k, settings.partitions) in lost]:
            del due[key]
