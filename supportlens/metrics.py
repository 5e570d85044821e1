"""Every Prometheus metric of supportlens, declared once with its meaning.

Processes import the objects from here; no module invents a metric name of its own.
Tests that need isolation pass their own ``registry``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram


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
