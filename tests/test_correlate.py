"""Correlation state: dedupe, when to emit, and requests that depend only on their spans."""

from __future__ import annotations

import itertools

from span_factory import client, server
from supportlens.contracts import FaultReport
from streams.catalog import load_catalog
from streams.correlate import (
    Pending,
    SideClock,
    Timing,
    add_report,
    add_span,
    build_request,
    due_at,
    request_version,
    expired,
    mark_emitted,
    waiting_for,
)

CATALOG = load_catalog()
TIMING = Timing(settle_s=2, grace_s=30, retain_s=300)


def test_a_redelivered_span_is_recognized_and_ignored():
    state, added = add_span(None, client(), now_s=100)
    assert added
    state, added = add_span(state, client(), now_s=101)
    assert not added and len(state.spans) == 1 and state.last_seen_s == 100


def test_a_request_waits_for_its_missing_side_then_settles_once_both_are_there():
    state, _ = add_span(None, server("edge-gateway", "s1", "c1", 10, 50), now_s=100, ts_ms=5_000)
    assert waiting_for(state) == "client" and state.ref_ms == 5_000
    state, _ = add_span(state, client(), now_s=105, ts_ms=4_000)
    assert waiting_for(state) is None and state.ref_ms == 4_000
    assert due_at(state, TIMING) == 107  # both sides: settle after the last span
    state, _ = add_span(state, server("auth", "s2", "s1", 12, 5), now_s=106, ts_ms=5_100)
    assert due_at(state, TIMING) == 108
    report_only, _ = add_report(None, FaultReport(report_id="x", received_at_us=1, client_ip="203.0.113.7"), "r9", 1, 9_000)
    assert waiting_for(report_only) == "server" and report_only.ref_ms == 9_000


def test_a_missing_side_is_given_up_when_its_stream_moved_past_in_record_time_or_fell_silent():
    clock = SideClock(started_s=1000)
    clock.observe("client", ts_ms=50_000, now_s=1001)
    # a lagging worker reads server spans of long ago: the server side has not passed yet
    clock.observe("server", ts_ms=20_000, now_s=1001)
    assert not clock.passed("server", ref_ms=10_000, grace_s=30, now_s=1005)
    clock.observe("server", ts_ms=40_001, now_s=1006)  # caught up past ref + grace
    assert clock.passed("server", ref_ms=10_000, grace_s=30, now_s=1006)
    # a side that stays silent for the grace period does not hold requests forever
    assert not clock.passed("client", ref_ms=60_000, grace_s=30, now_s=1030)
    assert clock.passed("client", ref_ms=60_000, grace_s=30, now_s=1031)
    assert SideClock(started_s=1000).passed("client", ref_ms=0, grace_s=30, now_s=1030)


def test_silence_counts_only_once_the_worker_has_read_all_there_is():
    clock = SideClock(started_s=1000)
    assert not clock.passed("server", ref_ms=10_000, grace_s=30, now_s=2000, caught_up=False)  # a backlog
    assert clock.passed("server", ref_ms=10_000, grace_s=30, now_s=2000, caught_up=True)


def test_a_replay_of_the_past_waits_for_its_own_stream_not_for_one_long_gone():
    clock = SideClock(started_s=0)
    clock.observe("server", ts_ms=1_000_000_000, now_s=1)  # today's traffic
    clock.observe("server", ts_ms=500_000_000, now_s=2)  # then a replay of yesterday
    assert not clock.passed("server", ref_ms=500_010_000, grace_s=30, now_s=3)


def test_after_emission_news_is_due_at_once_and_the_request_is_kept_until_retention_ends():
    state, _ = add_span(None, client(), now_s=100)
    mark_emitted(state, now_s=130)
    assert not expired(state, TIMING, now_s=429) and expired(state, TIMING, now_s=430)
    state, _ = add_span(state, server("edge-gateway", "s1", "c1", 10, 50), now_s=140)
    assert due_at(state, TIMING) == 140
    state, _ = add_report(state, FaultReport(report_id="x", received_at_us=1, client_ip="203.0.113.7"), "r1", now_s=150)
    assert due_at(state, TIMING) == 140


def test_the_request_is_the_same_whatever_order_its_spans_came_in():
    spans = [client(), server("edge-gateway", "s1", "c1", 10, 300), server("orders", "s2", "s1", 15, 250),
             server("payment", "s3", "s2", 20, 200, status="error", http_status=503)]
    built = set()
    for order in itertools.permutations(spans):
        state = None
        for span in order:
            state, _ = add_span(state, span, now_s=1)
        built.add(dump_request(state))
    assert len(built) == 1
    request = load_request(built.pop())
    assert request.span_count == 4 and request.version == request_version(state)
    assert request.completeness == "complete"
    assert request.root_service == "edge-gateway" and request.teams == ["commerce", "payments", "sre"]
    assert [h.service for h in request.hops] == ["edge-gateway", "orders", "payment"]
    assert request.hops[2].offset_us == 20_000 and request.client_ip == "203.0.113.7"
    assert request.diagnosis.cls == "server_error" and request.server_status == "error"


def test_a_late_span_makes_a_new_version_that_knows_more():
    state, _ = add_span(None, client(status="error", http_status=None, error_code="CONNECT_TIMEOUT"), now_s=1)
    first = build_request("r1", state, CATALOG)
    assert (first.span_count, first.completeness, first.diagnosis.cls) == (1, "client_only", "network_unreachable")
    mark_emitted(state, now_s=31)
    state, _ = add_span(state, server("edge-gateway", "s1", "c1", 10, 50), now_s=40)
    second = build_request("r1", state, CATALOG)
    assert second.span_count == 2 and second.completeness == "complete"
    assert second.version > first.version


def test_versions_rise_with_the_span_count_and_differ_for_other_spans_of_the_same_count():
    """A request rebuilt after a crash from only some of its spans must not repeat a version
    it had with other spans, nor outrank the version built from all of them."""
    spans = [client(), server("edge-gateway", "s1", "c1", 10, 300), server("orders", "s2", "s1", 15, 250)]

    def version(of):
        state = None
        for span in of:
            state, _ = add_span(state, span, now_s=1)
        return request_version(state)

    full = version(spans)
    assert version(list(reversed(spans))) == full  # order does not matter
    subsets = [version([a, b]) for a, b in itertools.combinations(spans, 2)]
    assert len(set(subsets)) == 3 and all(v < full for v in subsets)
    assert all(version([s]) < min(subsets) for s in spans)


def test_a_reports_attached_client_span_completes_a_request_seen_only_from_the_server():
    state, _ = add_span(None, server("edge-gateway", "s1", "c1", 10, 50), now_s=1)
    crashed = client(status="error", error_code="APP_CRASH")
    other = client(request_id="r0", span_id="c0")
    report = FaultReport(report_id="x", received_at_us=1, client_ip="203.0.113.7", request_ids=["r1"],
                         client_log=[other, crashed])
    state, changed = add_report(state, report, "r1", now_s=5)
    assert changed and [s.request_id for s in state.spans] == ["r1", "r1"]  # r0 belongs to another key
    request = build_request("r1", state, CATALOG)
    assert request.completeness == "complete" and request.diagnosis.cls == "client_crash"
    assert add_report(state, report, "r1", now_s=6)[1] is False  # the same report again changes nothing


def dump_request(state: Pending) -> bytes:
    from supportlens.contracts import encode

    return encode(build_request("r1", state, CATALOG))


def load_request(data: bytes):
    from supportlens.contracts import CorrelatedRequest, decode

    return decode(data, CorrelatedRequest)
