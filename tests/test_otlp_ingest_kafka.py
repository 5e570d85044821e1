"""The OTel Collector's kafka exporter as an input: its records on ``otlp-spans`` (otlp_proto and
otlp_json, keyed by trace id or not, partitioned its own way) and client spans through the gateway
correlate into one request per request id, over six partitions, with a real worker."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from itertools import islice

import pytest
from confluent_kafka import Producer

from helpers import WorkerProcess
from supportlens.config import load_settings
from supportlens.contracts import CorrelatedRequest, Span, decode
from supportlens.gateway.otlp_wire import to_otlp_json
from supportlens.simulator.generate import Simulation
from supportlens.simulator.otlp_export import encode_export, export_request
from supportlens.simulator.run import SimulateOptions, plan_for
from supportlens.simulator.world import build_world
from supportlens.topic_reader import read_range
from supportlens.topics import provision
from test_gateway_http import post_json
from test_gateway_kafka import kafka_gateway

pytestmark = pytest.mark.kafka
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5"}


def _simulated_spans() -> list[Span]:
    options = SimulateOptions("service-outage", 20, 10, seed=5)
    simulation = Simulation(plan_for(options), build_world(options.seed, options.users))
    return [e.record for tick in simulation.ticks() for e in tick.events if isinstance(e.record, Span)]


def _chunks(items: list, size: int):
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def test_collector_records_and_gateway_client_spans_correlate_into_one_request_each(kafka, tmp_path):
    settings = load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"o{uuid.uuid4().hex[:8]}.", partitions=6)
    provision(settings)
    spans = _simulated_spans()
    servers = [s for s in spans if s.side == "server"]
    clients = [s for s in spans if s.side == "client"]
    truth: dict[str, int] = defaultdict(int)
    for span in spans:
        truth[span.request_id] += 1

    worker = WorkerProcess(settings, tmp_path / "worker.log", **FAST).wait_ready()
    try:
        # as the exporter writes them: one export a record, several services (resource spans) in each;
        # keyed by trace id or not keyed, and librdkafka's own partitioner, not ours
        producer = Producer(settings.kafka_config())
        flavours = [("otlp_proto", True), ("otlp_json", True), ("otlp_proto", False), ("otlp_json", False)]
        exports = list(_chunks(servers, 40))
        assert any(len(export_request(chunk).resource_spans) > 3 for chunk in exports)
        for i, chunk in enumerate(exports):
            encoding, keyed = flavours[i % 4]
            producer.produce(settings.topic("otlp-spans"), value=encode_export(export_request(chunk), encoding),
                             key=chunk[0].trace_id.encode() if keyed else None)
        # a record that is no export, and an export with one bad span among good ones
        producer.produce(settings.topic("otlp-spans"), value=b"\x0a\x05garbage")
        bad = export_request([Span(request_id="bad-1", side="server", service="api", start_us=10, duration_us=1,
                                   status="ok")])
        bad.resource_spans[0].scope_spans[0].spans[0].end_time_unix_nano = 1  # ends before it starts
        producer.produce(settings.topic("otlp-spans"), value=bad.SerializeToString())
        assert producer.flush(30) == 0

        with kafka_gateway(settings) as url:
            for chunk in _chunks(clients, 50):
                request = export_request(chunk, consent=True)
                answer = post_json(f"{url}/v1/traces", to_otlp_json(request))
                assert answer.status == 200

        deadline = time.monotonic() + 120
        while True:
            requests: dict[str, list[CorrelatedRequest]] = defaultdict(list)
            for message in read_range(settings, [settings.topic("requests")]):
                requests[message.key().decode()].append(decode(message.value(), CorrelatedRequest))
            highest = {key: max(copies, key=lambda r: r.version) for key, copies in requests.items()}
            if set(highest) >= set(truth) and all(highest[k].span_count == n for k, n in truth.items()):
                break
            complete = sum(k in highest and highest[k].span_count == n for k, n in truth.items())
            assert time.monotonic() < deadline, f"{complete}/{len(truth)} complete\n{worker.tail()}"
            time.sleep(1)
        dead = list(read_range(settings, [settings.topic("dlq")]))
    finally:
        worker.stop()

    assert set(highest) == set(truth)  # one request per request id, no stray ones
    with_client = {s.request_id for s in clients}
    assert all(highest[k].has_client == (k in with_client) for k in truth)
    reasons = sorted(dict(m.headers())["reason"].decode() for m in dead)
    assert len(reasons) == 2, reasons
    assert any("not a protobuf ExportTraceServiceRequest" in r for r in reasons)
    assert any("resourceSpans[0].scopeSpans[0].spans[0]" in r and "endTimeUnixNano" in r for r in reasons)
