"""Diagnosis and user-language explanations, as pure functions over hand-made spans."""

from __future__ import annotations

import msgspec
import pytest

from span_factory import T0, client, server
from supportlens.contracts import FaultReport, Span
from streams.catalog import load_catalog
from streams.correlate import Pending, add_span, build_request
from streams.diagnose import diagnose_report, diagnose_spans, primary_request_id

CATALOG = load_catalog()


def chain(**overrides) -> list[Span]:
    """edge-gateway → orders → payment, each hop well inside its objective unless overridden."""
    spans = {
        "gw": server("edge-gateway", "s1", "c1", 20, 300),
        "orders": server("orders", "s2", "s1", 25, 280),
        "payment": server("payment", "s3", "s2", 40, 200),
    }
    spans.update(overrides)
    return list(spans.values())


def test_a_healthy_request_is_ok():
    assert diagnose_spans(client(), chain(), CATALOG).cls == "ok"


def test_a_5xx_is_blamed_on_the_deepest_failing_hop_and_its_team():
    spans = chain(
        gw=server("edge-gateway", "s1", "c1", 20, 300, status="error", http_status=502, error_code="UPSTREAM_ERROR"),
        orders=server("orders", "s2", "s1", 25, 280, status="error", http_status=502, error_code="UPSTREAM_ERROR"),
        payment=server("payment", "s3", "s2", 40, 200, status="error", http_status=503,
                       error_code="PAYMENT_UNAVAILABLE", error_message="connect to pay-db-7.prod.internal:5432 refused"),
    )
    d = diagnose_spans(client(status="error", http_status=502), spans, CATALOG)
    assert (d.cls, d.service, d.team, d.code) == ("server_error", "payment", "payments", "PAYMENT_UNAVAILABLE")
    assert d.catalog_version == CATALOG.version


def test_a_catalogued_4xx_is_misuse_and_an_unknown_4xx_is_not_called_misuse():
    refused = chain(gw=server("edge-gateway", "s1", "c1", 20, 30), orders=server("auth", "s2", "s1", 22, 5, http_status=401, error_code="ORDER_BEFORE_LOGIN"))
    d = diagnose_spans(client(status="error", http_status=401, error_code="ORDER_BEFORE_LOGIN"), refused, CATALOG)
    assert (d.cls, d.code, d.service, d.team) == ("client_misuse", "ORDER_BEFORE_LOGIN", "auth", "identity")
    odd = chain(orders=server("orders", "s2", "s1", 25, 20, http_status=418, error_code="TEAPOT"))
    assert diagnose_spans(client(status="error", http_status=418), odd, CATALOG).cls == "unknown"


def test_a_crash_after_a_good_answer_is_the_apps_fault():
    crashed = client(status="error", error_code="APP_CRASH", error_message="SIGSEGV in CheckoutViewModel.render")
    d = diagnose_spans(crashed, chain(), CATALOG)
    assert (d.cls, d.team) == ("client_crash", "mobile")


@pytest.mark.parametrize("code", ["DNS_FAILURE", "CONNECT_TIMEOUT", ""])
def test_a_failed_request_with_no_server_span_never_reached_us(code):
    d = diagnose_spans(client(status="error", http_status=None, error_code=code), [], CATALOG)
    assert d.cls == "network_unreachable"


def test_a_hop_over_its_own_objective_is_server_slow_even_when_its_callees_were_fast():
    slow = chain(orders=server("orders", "s2", "s1", 25, 900), payment=server("payment", "s3", "s2", 40, 100),
                 gw=server("edge-gateway", "s1", "c1", 20, 920))
    d = diagnose_spans(client(duration_us=1_000_000), slow, CATALOG)
    assert (d.cls, d.service) == ("server_slow", "orders")  # 800 ms of its own, objective 400 ms
    assert "800 ms" in d.evidence


def test_time_lost_between_device_and_server_is_a_slow_network():
    d = diagnose_spans(client(duration_us=6_000_000), chain(), CATALOG)
    assert d.cls == "network_slow"
    assert diagnose_spans(client(duration_us=1_500_000), chain(), CATALOG).cls == "ok"  # under the threshold


def _report(**kw) -> FaultReport:
    base = dict(report_id="rep-1", received_at_us=T0 + 30_000_000, user_id="u1", client_ip="203.0.113.7",
                locale="en", request_ids=["r1"], client_log=[client()])
    return FaultReport(**{**base, **kw})


def test_report_wording_follows_the_users_locale_and_names_the_service_in_their_words():
    spans = chain(payment=server("payment", "s3", "s2", 40, 200, status="error", http_status=503,
                                 error_message="Traceback (most recent call last): pay-db-7.prod.internal"))
    request = build_request("r1", _pending([client(status="error", http_status=502), *spans]), CATALOG)
    en = diagnose_report(_report(), request, CATALOG, now_us=T0)
    zh = diagnose_report(_report(locale="zh-CN"), request, CATALOG, now_us=T0)
    assert en.title == "Our payment service failed"
    assert zh.title == "我们的支付服务出现故障"
    assert en.doc_url.startswith("https://") and en.primary_request_id == "r1"
    for text in (en.title, en.explanation, en.action, zh.explanation, zh.action):
        assert "prod.internal" not in text and "Traceback" not in text and "{" not in text


def test_a_misuse_gets_the_codes_own_advice_and_doc_link():
    refused = [server("edge-gateway", "s1", "c1", 20, 30), server("auth", "s2", "s1", 22, 5, http_status=401, error_code="ORDER_BEFORE_LOGIN")]
    request = build_request("r1", _pending([client(status="error", http_status=401, error_code="ORDER_BEFORE_LOGIN"), *refused]), CATALOG)
    out = diagnose_report(_report(locale="zh-CN"), request, CATALOG, now_us=T0)
    assert out.diagnosis.cls == "client_misuse"
    assert "POST /v1/login" in out.action
    assert out.doc_url.endswith("/api/orders#authentication")


def test_a_report_on_a_request_we_never_saw_is_diagnosed_from_the_attached_client_span():
    lost = client(status="error", http_status=None, error_code="CONNECT_TIMEOUT", error_message="connect to 10.2.3.4 timed out")
    out = diagnose_report(_report(client_log=[client(request_id="r0", span_id="c0"), lost]), None, CATALOG, now_us=T0)
    assert out.diagnosis.cls == "network_unreachable"
    assert out.title == "Your request never reached us"
    assert "10.2.3.4" not in out.explanation
    nothing = diagnose_report(_report(request_ids=["r9"], client_log=[]), None, CATALOG, now_us=T0)
    assert nothing.diagnosis.cls == "unknown"


def test_the_report_is_about_the_first_request_it_names_even_when_another_failed():
    slow = client(request_id="a", span_id="ca", duration_us=9_000_000)
    refused = client(request_id="b", span_id="cb", status="error", http_status=401, error_code="ORDER_BEFORE_LOGIN")
    assert primary_request_id(_report(request_ids=["a", "b"], client_log=[refused, slow])) == "a"
    assert primary_request_id(_report(request_ids=[], client_log=[slow, refused])) == "b"
    another = msgspec.structs.replace(refused, request_id="c", span_id="cc")
    assert primary_request_id(_report(request_ids=[], client_log=[refused, another])) == ""  # ambiguous


def test_every_class_has_wording_in_every_locale():
    for cls in CATALOG.classes:
        for locale in ("en", "zh-CN"):
            text, url = CATALOG.wording(cls, "", locale)
            assert text.title and text.explanation and text.action and url.startswith(CATALOG.docs_base)


def _pending(spans) -> Pending:
    state = None
    for span in spans:
        state, _ = add_span(state, span, now_s=1)
    return state
