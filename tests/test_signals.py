"""What a worker counts as failure evidence, per dimension value and bucket, and its clock (no Kafka)."""

from __future__ import annotations

import pytest

from span_factory import T0, client, server
from supportlens.contracts import FaultReport, Network, SignalClock, SignalCount
from streams.catalog import load_catalog
from streams.signals import OTHER, SignalAggregator, count_new_failures, failure_dimensions

CATALOG = load_catalog()
US = 1_000_000
WHERE = dict(region="cn-east", app_version="5.3.1", platform="ios")
CLIENT_DIMS = {**WHERE, "network": "China Telecom"}


def failed_client(**kw):
    return client(status="error", network=Network(isp="China Telecom"), user_id="u1", **WHERE, **kw)


def failed_server(service: str, http: int):
    return server(service, "s1", "c1", 10, 50, status="error", http_status=http, user_id="u1", **WHERE)


@pytest.mark.parametrize(("span", "expected"), [
    (failed_client(http_status=503), {**CLIENT_DIMS, "diagnosis_class": "server_error"}),
    (failed_client(http_status=401, error_code="ORDER_BEFORE_LOGIN"), {**CLIENT_DIMS, "diagnosis_class": "client_misuse"}),
    (failed_client(http_status=201, error_code="APP_CRASH"),
     {**CLIENT_DIMS, "diagnosis_class": "client_crash", "service": "mobile-app"}),
    (failed_client(http_status=None, error_code="CONNECT_TIMEOUT"), {**CLIENT_DIMS, "diagnosis_class": "network_unreachable"}),
    (failed_client(http_status=404, error_code="NOT_IN_THE_CATALOG"), {**CLIENT_DIMS, "diagnosis_class": "unknown"}),
], ids=["5xx", "catalogued-4xx", "crash", "no-http", "uncatalogued-4xx"])
def test_a_failed_client_span_counts_where_its_user_is_and_what_it_says(span, expected):
    assert failure_dimensions(span, CATALOG) == expected


def test_a_server_span_that_failed_itself_names_its_service():
    assert failure_dimensions(failed_server("payment", 503), CATALOG) == {
        **WHERE, "diagnosis_class": "server_error", "service": "payment"}


@pytest.mark.parametrize("http", [502, 504])
def test_a_server_span_whose_dependency_failed_does_not_blame_its_own_service(http):
    assert failure_dimensions(failed_server("edge-gateway", http), CATALOG) == {**WHERE, "diagnosis_class": "server_error"}


@pytest.mark.parametrize("span", [
    client(**WHERE),
    server("payment", "s1", "c1", 10, 50, **WHERE),
    server("auth", "s1", "c1", 10, 50, http_status=401, error_code="ORDER_BEFORE_LOGIN", **WHERE),  # ok: the caller's fault
], ids=["client", "server", "server-4xx"])
def test_a_span_that_did_not_fail_is_no_evidence(span):
    assert failure_dimensions(span, CATALOG) == {}


def test_a_request_counts_once_per_dimension():
    assert count_new_failures({"region", "network"}, {"region": "cn-east", "service": "payment"}) == {"service": "payment"}


def counts(signals) -> dict[tuple[str, str, int], SignalCount]:
    return {(s.dimension, s.value, s.bucket_start_us): s for s in signals if isinstance(s, SignalCount)}


def test_values_beyond_the_limit_of_a_dimension_share_one_other_line():
    aggregator = SignalAggregator(source="w1", max_values_per_dimension=3)
    for i in range(5):
        aggregator.failure(client(user_id=f"u{i}"), {"region": f"r{i}"})
    aggregator.failure(client(user_id="u9"), {"region": "r0"})
    lines = counts(aggregator.flush(lambda _p: True, T0))
    assert {value: line.failed for (_, value, _), line in lines.items()} == {"r0": 2, "r1": 1, "r2": 1, OTHER: 2}


def test_requests_failures_and_reports_count_in_their_buckets_with_distinct_users():
    aggregator = SignalAggregator(source="w1")
    span = failed_client(http_status=503, start_us=T0 + 3 * US)
    aggregator.request(span)
    aggregator.failure(span, failure_dimensions(span, CATALOG))
    aggregator.failure(failed_client(http_status=503, start_us=T0 + 4 * US), {"region": "cn-east"})  # the same user
    aggregator.report(FaultReport(report_id="f1", received_at_us=T0 + 12 * US, client_ip="203.0.113.7", user_id="u2",
                                  region="cn-east", platform="ios", network=Network(isp="China Telecom")))
    lines = counts(aggregator.flush(lambda _p: True, T0 + 20 * US))
    region = lines[("region", "cn-east", T0)]
    assert (region.requests, region.failed, region.reports, len(region.users), len(region.active_users)) == (1, 2, 0, 1, 1)
    assert lines[("diagnosis_class", "server_error", T0)].requests == 0  # traffic counts where a span can tell
    later = lines[("region", "cn-east", T0 + 10 * US)]
    assert (later.failed, later.reports, len(later.users)) == (0, 1, 1)
    reported = {"region": "cn-east", "platform": "ios", "network": "China Telecom"}  # no app version: not counted
    assert set(lines) == {*((d, v, T0) for d, v in failure_dimensions(span, CATALOG).items()),
                          *((d, v, T0 + 10 * US) for d, v in reported.items())}


def test_the_watermark_is_the_slowest_partition_still_behind():
    aggregator = SignalAggregator(source="w1", lateness_s=5)
    assert aggregator.watermark(lambda _p: False, T0) == 0  # nothing read yet: no clock
    aggregator.saw(0, T0 + 100 * US)
    aggregator.saw(1, T0 + 50 * US)
    aggregator.saw(1, T0 + 40 * US)  # older record: time never goes back
    assert aggregator.watermark(lambda _p: False, T0 + 200 * US) == T0 + 50 * US
    assert aggregator.watermark(lambda p: p == 1, T0 + 200 * US) == T0 + 100 * US


def test_when_every_partition_is_caught_up_time_goes_on_once_no_record_came_for_the_lateness():
    aggregator = SignalAggregator(source="w1", lateness_s=5)
    aggregator.saw(0, T0 + 100 * US)
    aggregator.saw(1, T0 + 50 * US)
    caught_up = lambda _p: True  # noqa: E731
    assert aggregator.watermark(caught_up, T0 + 200 * US) == T0 + 100 * US  # records just came: the latest
    assert aggregator.watermark(caught_up, T0 + 204 * US) == T0 + 100 * US  # silent for 4 s: still waiting
    assert aggregator.watermark(caught_up, T0 + 205 * US) == T0 + 200 * US  # silent for 5 s: the clock less 5 s
    aggregator.saw(0, T0 + 206 * US)  # a record again: time is the data's
    assert aggregator.watermark(caught_up, T0 + 207 * US) == T0 + 206 * US
    assert aggregator.watermark(caught_up, T0 + 212 * US) == T0 + 207 * US


def test_a_flush_sends_the_counts_then_the_clock_and_starts_afresh():
    aggregator = SignalAggregator(source="w1")
    aggregator.saw(0, T0 + 15 * US)
    aggregator.failure(client(start_us=T0 + 12 * US), {"region": "cn-east"})
    aggregator.failure(client(start_us=T0 + 2 * US), {"region": "cn-east"})
    first = aggregator.flush(lambda _p: False, T0 + 20 * US)
    assert [(type(s).__name__, getattr(s, "bucket_start_us", None)) for s in first] == [
        ("SignalCount", T0), ("SignalCount", T0 + 10 * US), ("SignalClock", None)]
    assert first[-1] == SignalClock(source="w1", watermark_us=T0 + 15 * US, sent_at_us=T0 + 20 * US)
    assert aggregator.flush(lambda _p: False, T0 + 21 * US) == [
        SignalClock(source="w1", watermark_us=T0 + 15 * US, sent_at_us=T0 + 21 * US)]
