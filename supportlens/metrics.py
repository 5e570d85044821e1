"""Every Prometheus metric of supportlens, declared once with its meaning.

Processes import the objects from here; no module invents a metric name of its own.
Tests that need isolation pass their own ``registry``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        ns = "supportlens"
        self.events_in = Counter(
            "events_in", "Records read, by logical topic.", ["topic"], namespace=ns, registry=registry
        )
        self.events_out = Counter(
            "events_out", "Records written, by logical topic.", ["topic"], namespace=ns, registry=registry
        )
        self.dead_letters = Counter(
            "dead_letters", "Records sent to the dead-letter topic, by source topic.", ["topic"],
            namespace=ns, registry=registry,
        )
        self.duplicates = Counter(
            "duplicate_spans", "Spans seen again (redelivery or double export) and ignored.",
            namespace=ns, registry=registry,
        )
        self.emit_delay = Histogram(
            "correlation_emit_delay_seconds", "Wall time from a request's first span to its emission.",
            namespace=ns, registry=registry, buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.sink_rows = Counter(
            "sink_rows_written", "Rows the ClickHouse sink inserted, by table.", ["table"],
            namespace=ns, registry=registry,
        )
        self.sink_write_seconds = Histogram(
            "sink_write_seconds", "Time of one ClickHouse insert of a sink batch, by table.", ["table"],
            namespace=ns, registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.sink_write_failures = Counter(
            "sink_write_failures", "ClickHouse inserts that failed and will be retried, by table.", ["table"],
            namespace=ns, registry=registry,
        )
        self.sink_held_records = Gauge(
            "sink_held_records", "Records read but not yet written and committed (held while ClickHouse refuses).",
            namespace=ns, registry=registry,
        )
