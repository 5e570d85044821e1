"""Every Prometheus metric of supportlens, declared once with its meaning.

Processes import the objects from here; no module invents a metric name of its own.
Tests that need isolation pass their own ``registry``. Alert rules in ``alert_rules/``
name these series (Counters gain ``_total`` on the wire).

Label cardinality is bounded by construction: ``topic`` and ``table`` are our own
logical names, ``component`` one of :data:`COMPONENTS`, surge ``value`` one of the
bounded set the surge detector tracks per dimension, per-incident series exist only
while that incident is open, and a gateway's ``app`` is one of the apps of its keys file
or ``(unknown)``. No label or log line ever holds an API key.
"""

from __future__ import annotations

import logging
from functools import cache

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server,
)

from supportlens.config import Settings
from supportlens.errors import UserError

log = logging.getLogger(__name__)

COMPONENTS = ("worker", "sink", "gateway")


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
        self.spans_in = Counter(
            "spans_in", "Spans read from a span topic, by logical topic (a record may carry many).", ["topic"],
            namespace=ns, registry=registry,
        )
        self.correlation_in_memory = Gauge(
            "correlation_requests_in_memory", "Requests the worker holds: open (their input records not yet "
            "committed) or retained (emitted, kept for late spans).", ["state"], namespace=ns, registry=registry,
        )
        self.outbox_failures = Counter(
            "worker_output_failures", "Outputs Kafka refused for good; their input stays uncommitted, so a restart "
            "sends them again.", ["topic"], namespace=ns, registry=registry,
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

        self.consumer_lag = Gauge(
            "consumer_lag_records", "Records on the broker not yet read, by component and logical topic "
            "(summed over the partitions this process owns).", ["component", "topic"],
            namespace=ns, registry=registry,
        )
        self.last_progress = Gauge(
            "last_progress_timestamp_seconds", "Wall time (Unix seconds) a component last processed a record.",
            ["component"], namespace=ns, registry=registry,
        )
        self.processing_latency = Histogram(
            "processing_latency_seconds", "Wall time from a record's Kafka timestamp to its processing, by component.",
            ["component"], namespace=ns, registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.surge_score = Gauge(
            "surge_score", "Score in [0, 1] of each active surge (the series goes away when the surge ends).",
            ["dimension", "value"], namespace=ns, registry=registry,
        )
        self.surges_started = Counter(
            "surges_started", "Surges that started, by dimension.", ["dimension"], namespace=ns, registry=registry,
        )
        self.canary_worse = Gauge(
            "canary_worse", "1 while a rolling-out version of a service or app fails significantly more often than "
            "the version it replaces (the series goes away when it no longer does, or the rollout is over).",
            ["target", "version", "baseline_version", "diagnosis_class", "drill"], namespace=ns, registry=registry,
        )
        self.canary_failure_share = Gauge(
            "canary_failure_share", "Share of requests failing with the class over the comparison window, of the new "
            "version (role new) and of the one it replaces (role baseline), while a canary finding is open.",
            ["target", "version", "role", "diagnosis_class", "drill"], namespace=ns, registry=registry,
        )
        self.canary_findings = Counter(
            "canary_findings", "Canary findings that started: a version worse than the one it replaces.",
            ["target"], namespace=ns, registry=registry,
        )
        self.misuse_detections = Counter(
            "misuse_detections", "Catalogued misuse found in a user's sequence of requests and behaviour, by code.",
            ["code", "drill"], namespace=ns, registry=registry,
        )
        self.reports_traced = Counter(
            "reports_traced_to_misuse", "Diagnosed reports traced to an earlier misuse (their symptom looked like "
            "another class), by code and the class it surfaced as.", ["code", "surfaced_as"],
            namespace=ns, registry=registry,
        )
        self.incidents_open = Gauge(
            "incidents_open", "Open incidents, by severity and drill flag.", ["severity", "drill"],
            namespace=ns, registry=registry,
        )
        self.incident_open_started = Gauge(
            "incident_open_started_timestamp_seconds",
            "When each open incident started (Unix seconds, event time); the series goes away when it resolves.",
            ["incident_id", "severity", "root_key", "drill"], namespace=ns, registry=registry,
        )
        self.incident_transitions = Counter(
            "incident_transitions", "Incident lifecycle events written, by transition.", ["transition"],
            namespace=ns, registry=registry,
        )
        self.incident_state_slimmed = Counter(
            "incident_state_slimmed", "Dimension values whose stored state was too large and was kept without the "
            "users of its open buckets (counts survive; a backlog that large is worth a look).",
            namespace=ns, registry=registry,
        )
        self.gateway_requests_refused = Counter(
            "gateway_requests_refused", "Requests the gateway refused before reading them, by client app and reason "
            "(unauthenticated: no API key or an unknown one, app \"(unknown)\"; rate_limited: over the app's rate, "
            "answered 429 with Retry-After).", ["app", "reason"], namespace=ns, registry=registry,
        )
        self.gateway_unconfirmed = Counter(
            "gateway_unconfirmed", "Requests the gateway answered 503 because Kafka did not confirm their records in "
            "time (Kafka away or stalled); clients retry with the same ids. By endpoint.", ["endpoint"],
            namespace=ns, registry=registry,
        )
        self.notification_deliveries = Counter(
            "notification_deliveries", "Attempts to deliver a customer notification, by channel and outcome "
            "(delivered | failed | rate_limited | dead_lettered | skipped_drill | no_channel).", ["channel", "outcome"],
            namespace=ns, registry=registry,
        )


@cache
def process_metrics() -> Metrics:
    """The metrics of this process, on the default registry that ``/metrics`` serves (created once:
    a second registration of the same names would fail)."""
    return Metrics(REGISTRY)


def serve_metrics(settings: Settings, port: int, what: str) -> None:
    """Serve the process's Prometheus metrics at ``/metrics`` (port 0: not at all)."""
    if not port:
        return
    try:
        start_http_server(port, addr=settings.metrics_host)
    except OSError as exc:
        raise UserError(f"the {what} cannot serve /metrics on {settings.metrics_host}:{port}: {exc.strerror or exc}",
                        hint=f"choose another port with SUPPORTLENS_{what.upper()}_METRICS_PORT (0 turns it off)") from None
    log.info("%s metrics at http://%s:%d/metrics", what, settings.metrics_host, port)


def metrics_route(registry: CollectorRegistry = REGISTRY) -> web.RouteDef:
    """``GET /metrics`` for an aiohttp app (the gateway, the support API)."""

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return web.get("/metrics", metrics)
