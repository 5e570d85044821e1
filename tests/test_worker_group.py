"""Two workers in one consumer group over six partitions: the same requests as one worker,
and nothing lost when one of them is killed with SIGKILL mid-run."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pytest

from helpers import WorkerProcess
from sinks.run_summary import observable_requests
from supportlens.config import Settings, load_settings
from supportlens.contracts import CorrelatedRequest, DiagnosedReport, decode
from supportlens.simulator.labels import ReportLabel, read_labels
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topic_reader import read_range
from supportlens.topics import provision

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]
FAST = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5",
        "SUPPORTLENS_WORKER_SESSION_TIMEOUT_S": "8"}
START = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)


def _settings(kafka) -> Settings:
    return load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"g{uuid.uuid4().hex[:8]}.", partitions=6)


def _options(tmp_path, name: str, speed: float) -> SimulateOptions:
    # the same seed and start: both runs send the very same spans and reports
    return SimulateOptions("service-outage", 100, 40, seed=3, speed=speed, start=START,
                           labels_path=tmp_path / f"{name}.jsonl")


def _outputs(settings: Settings) -> tuple[dict[str, list[CorrelatedRequest]], dict[str, DiagnosedReport]]:
    requests: dict[str, list[CorrelatedRequest]] = defaultdict(list)
    for message in read_range(settings, [settings.topic("requests")]):
        requests[message.key().decode()].append(decode(message.value(), CorrelatedRequest))
    reports = {r.report_id: r for r in (decode(m.value(), DiagnosedReport)
                                        for m in read_range(settings, [settings.topic("reports-diagnosed")]))}
    return requests, reports


def _wait_for(settings: Settings, truth: set[str], reports: set[str], workers: list[WorkerProcess],
              timeout: float = 180):
    """Every expected output, and then nothing new for a while (a later version may still come)."""
    deadline = time.monotonic() + timeout
    last, changed = -1, time.monotonic()
    while True:
        requests, diagnosed = _outputs(settings)
        total = sum(map(len, requests.values())) + len(diagnosed)
        if total != last:
            last, changed = total, time.monotonic()
        if set(requests) >= truth and set(diagnosed) >= reports and time.monotonic() - changed > 5:
            return requests, diagnosed
        if time.monotonic() > deadline:
            tails = "\n---\n".join(w.tail(30) for w in workers)
            raise AssertionError(f"{len(set(requests) & truth)}/{len(truth)} requests, "
                                 f"{len(set(diagnosed) & reports)}/{len(reports)} reports:\n{tails}")
        time.sleep(0.5)


def _highest(requests: dict[str, list[CorrelatedRequest]]) -> dict[str, CorrelatedRequest]:
    return {key: max(copies, key=lambda r: r.version) for key, copies in requests.items()}


def _spans_of(copies: list[CorrelatedRequest]) -> tuple[bool, set[str]]:
    """What all versions of a request were built from, together: its client side, its hops."""
    return any(c.has_client for c in copies), {hop.span_id for c in copies for hop in c.hops}


def _versions(copies: list[CorrelatedRequest]) -> list[tuple]:
    return [(c.version >> 20, c.completeness, c.has_client, sorted(h.span_id for h in c.hops), c.diagnosis.cls)
            for c in copies]


def _split_by_a_late_span(pair: list[CorrelatedRequest], single: list[CorrelatedRequest]) -> bool:
    """The one outcome the README allows a kill besides copies: a span later than a grace after
    its request was emitted, its earlier records committed before the kill, made a request of
    its own. Together the versions hold every span one worker joined, none of them more than it."""
    fullest = max(single, key=lambda r: r.version)
    client, hops = _spans_of([fullest])
    return _spans_of(pair) == (client, hops) and all(
        _spans_of([copy])[1] <= hops and (client or not copy.has_client) for copy in pair)


def test_two_workers_give_the_results_of_one_and_a_killed_one_loses_nothing(kafka, tmp_path):
    one, two = _settings(kafka), _settings(kafka)
    for settings in (one, two):
        provision(settings)

    alone = WorkerProcess(one, tmp_path / "alone.log", **FAST).wait_ready()
    try:
        simulate(one, _options(tmp_path, "one", speed=0))
        labels = list(read_labels(tmp_path / "one.jsonl"))
        truth = set(observable_requests(labels))
        report_ids = {l.report_id for l in labels if isinstance(l, ReportLabel)}
        single, single_reports = _wait_for(one, truth, report_ids, [alone])
    finally:
        alone.stop()

    first = WorkerProcess(two, tmp_path / "first.log", **FAST).wait_ready()
    second = WorkerProcess(two, tmp_path / "second.log", **FAST).wait_ready()
    workers = [first, second]
    try:
        sender = threading.Thread(target=simulate, args=(two, _options(tmp_path, "two", speed=4)))
        sender.start()
        time.sleep(5)  # mid-run: both workers hold requests in flight
        second.kill()  # its partitions go to the first once the group gives up on it
        sender.join(120)
        assert not sender.is_alive()
        assert set(observable_requests(read_labels(tmp_path / "two.jsonl"))) == truth  # the very same traffic
        pair, pair_reports = _wait_for(two, truth, report_ids, workers)
    finally:
        for worker in workers:
            worker.stop()

    assert set(pair) == set(single) == truth
    high_pair, high_single = _highest(pair), _highest(single)
    split = {key for key in truth if high_pair[key] != high_single[key]}
    assert all(_split_by_a_late_span(pair[key], single[key]) for key in split), "\n".join(
        f"{key}: pair {_versions(pair[key])} one worker {_versions(single[key])}" for key in split)
    assert len(split) <= len(truth) // 100, split  # the kill's moment, not the rule
    for key, copies in pair.items():  # a repeat after the kill is a copy, never other content
        by_version: dict[int, set[bytes]] = defaultdict(set)
        for copy in copies:
            by_version[copy.version].add(repr(copy).encode())
        assert all(len(contents) == 1 for contents in by_version.values()), key
    assert set(pair_reports) == set(single_reports) == report_ids
    assert {k: r.diagnosis.cls for k, r in pair_reports.items()} == {k: r.diagnosis.cls for k, r in single_reports.items()}
