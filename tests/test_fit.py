"""Every table the CLI prints, at 80 and at 120 columns: no id cut, no word broken.

Support copies a request or report id from one lookup into the next, so an id must print
whole on one line whatever the terminal. Other cells may wrap between words; a word is
never broken unless it is longer than ``LONGEST_WORD``, and then keeps its first 8
characters together.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter

import pytest
from rich.console import Console
from rich.table import Table

from supportlens.contracts import Account, Contact, DeliveryAttempt, IncidentEvent, Notification, Suspect
from supportlens.demo.incidents import day_counts_table
from supportlens.demo.main import _confusion_table
from supportlens.demo.receiver import Received
from supportlens.fit import LONGEST_WORD, MIN_CELL, Fitted, _plain, fit
from supportlens.store import TableCounts
from supportlens.store.lookup import (
    ChainSpan, IncidentHit, ProblemRow, ReportDetail, RequestChain, Timeline, TimelineEntry, TopProblems,
)
from supportlens.support import render

T0 = 1_796_601_600_000_000  # 2026-12-07 00:00 UTC
WIDTHS = (80, 120)


def _render(renderable, width: int) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text()


def _ids() -> list[str]:
    return [str(uuid.UUID(int=n * 0x1234_5678_9ABC_DEF0_1234_5678 + 7)) for n in range(1, 6)]


def _timeline() -> Timeline:
    ids = _ids()
    entries = [
        TimelineEntry(at_us=T0 + i * 1_000_000, kind="request" if i % 2 else "report", id=ids[i],
                      what="POST /v1/payments/charge" if i % 2 else "付款一直失败。" if i == 2 else
                      "Payment failed, please try again later",
                      diagnosis_class="server_error", service="payment", status="error", duration_us=1_234_500,
                      detail="payment answered 503 PAYMENT_UNAVAILABLE after 55 ms" if i % 2 else
                      "我们的支付服务出现故障", client_ip="203.0.113.7",
                      user_id="u-1042", account_id="acct-vip-0007")
        for i in range(len(ids))
    ]
    return Timeline(key_kind="ip", key="203.0.113.7", since_us=T0, until_us=T0 + 3_600_000_000, requests=3, failed=3,
                    reports=2, entries=entries,
                    incidents=[IncidentHit(incident_id="inc-20261207-0001-service-payment", title="Payment failures",
                                           severity="sev2", state="open", started_at_us=T0, resolved_at_us=None,
                                           root_key="service=payment", requests=3)])


def _chain() -> RequestChain:
    request_id = _ids()[0]
    spans = [ChainSpan(side=side, service=service, operation=operation, span_id=f"s{i}", parent_span_id=f"s{i - 1}",
                       offset_us=i * 20_000, duration_us=400_000 - i * 90_000, status="error" if i else "ok",
                       http_status=503 if i else 200, error_code="PAYMENT_UNAVAILABLE" if i else "")
             for i, (side, service, operation) in enumerate([
                 ("client", "mobile-app", "POST /v1/orders/checkout"), ("server", "edge-gateway", "POST /v1/orders"),
                 ("server", "payment", "PaymentService.Charge")])]
    return RequestChain(request_id=request_id, found=True, start_us=T0, operation="POST /v1/orders/checkout",
                        client_ip="203.0.113.7", user_id="u-1042", account_id="acct-vip-0007", app_version="5.3.1",
                        platform="ios", region="cn-east", network="China Telecom", completeness="complete", version=3,
                        diagnosis_class="server_error", diagnosis_service="payment", diagnosis_team="payments",
                        diagnosis_code="PAYMENT_UNAVAILABLE", evidence="payment answered 503 after 55 ms",
                        spans=spans, reports=_ids()[1:3])


def _report() -> ReportDetail:
    return ReportDetail(report_id=_ids()[1], found=True, received_at_us=T0, client_ip="203.0.113.7",
                        user_id="u-1042", account_id="acct-vip-0007", locale="zh-CN", app_version="5.3.1",
                        platform="ios", region="cn-east", error_code="E_PAY", user_message="支付失败了，请帮忙看看",
                        request_ids=_ids()[:3], diagnosed=True, diagnosis_class="server_error",
                        diagnosis_service="payment", diagnosis_team="payments", title="我们的支付服务出现故障",
                        explanation="支付服务暂时不可用，我们正在处理。", action="请稍后重试",
                        doc_url="https://docs.example.com/status/payment-incidents-and-what-to-do")


def _incidents() -> list[IncidentEvent]:
    return [IncidentEvent(incident_id=f"inc-20261207-000{i}-network-china-telecom", sequence=2, transition="updated",
                          at_us=T0, started_at_us=T0, severity="sev2", title="Requests from China Telecom fail",
                          reason="still unresolved after 1 h (policy: unresolved_after_s = 3600)",
                          root_key="network=China Telecom", teams=["network", "sre"], affected_users=1_234,
                          dimensions={"network": "China Telecom"},
                          suspects=[Suspect(change_id=f"chg-20261207-edge-gateway-rollout-000{i}", kind="infra",
                                            service="edge-gateway", started_at_us=T0 - 300_000_000, score=0.39,
                                            reason="edge-gateway infrastructure changed 5 min before the surge, "
                                                   "in the affected region cn-east")] * i)
            for i in range(1, 3)]


def _accounts() -> list[Account]:
    return [Account(account_id=f"acct-vip-000{i}-enterprise", name="Acme Retail Group (APAC)", tier="vip",
                    locale="zh-CN", channel="webhook" if i % 2 else "email",
                    webhook_url="https://hooks.acme-retail.example.com/supportlens/notices" if i % 2 else "",
                    contacts=[] if i % 2 else [Contact(email="oncall@acme-retail.example.com")])
            for i in range(1, 4)]


def _confusion() -> Table:
    return _confusion_table(Counter({("server_error", "server_error"): 1_204, ("network_unreachable",
                                     "network_unreachable"): 311, ("server_error", "unknown"): 2}))


def _day_counts() -> Table:
    notice = Notification(notification_id="n-1", account_id="acct-00001", kind="incident_declared",
                          created_at_us=T0, incident_id="inc-1")
    attempt = DeliveryAttempt(notification_id="n-1", attempt=1, account_id="acct-00001", at_us=T0,
                              channel="webhook", outcome="delivered")
    received = Received("/hooks/acct-00001", {}, b"{}", True)
    return day_counts_table({"surges": [], "incidents": _incidents(), "notifications": [notice],
                             "deliveries": [attempt]}, [received], [])


# what each table shows, and the ids in it that must print whole
TABLES = {
    "lookup --ip": (lambda: render.timeline_table(_timeline()), _ids()),
    "lookup --request": (lambda: render.chain_view(_chain()), [_ids()[0], *_ids()[1:3]]),
    "lookup --report": (lambda: render.report_view(_report()), _ids()[:3]),
    "top": (lambda: render.top_table(TopProblems(by="network", since_us=T0, until_us=T0 + 86_400_000_000, rows=[
        ProblemRow(diagnosis_class="network_unreachable", value="China Telecom", requests=12_345, users=2_345,
                   share=0.0412)])), []),
    "counts": (lambda: render.counts_table(TableCounts(rows={"requests": 1_000_000, "report_diagnoses": 42},
                                                       stored={"requests": 1_000_321, "report_diagnoses": 42}),
                                           "supportlens"), ["report_diagnoses"]),
    "incidents": (lambda: render.incidents_table(_incidents()),
                  [f"inc-20261207-000{i}-network-china-telecom" for i in (1, 2)]),
    "accounts list": (lambda: render.accounts_table(_accounts()),
                      [f"acct-vip-000{i}-enterprise" for i in (1, 2, 3)]),
    "demo confusion": (lambda: fit(_confusion()), []),
    "demo counts": (lambda: fit(_day_counts()), []),
}


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text) if w]


def _cells(renderable, width: int) -> list[str]:
    """The plain text of every cell the tables in ``renderable`` show at ``width`` (not those of
    columns they leave out there, which they name)."""
    fitted = [renderable] if isinstance(renderable, Fitted) else [
        r for r in getattr(renderable, "renderables", []) if isinstance(r, Fitted)]
    return [_plain(cell) for f in fitted for column in f.table.columns
            if str(column.header) not in f.layout(width).hidden for cell in column.cells]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(TABLES))
def test_every_cli_table_keeps_ids_whole_and_words_unbroken(name, width):
    build, ids = TABLES[name]
    renderable = build()
    text = _render(renderable, width)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width, text
    assert "…" not in text, text  # rich's mark of a cut cell
    for an_id in ids:
        assert any(an_id in line for line in lines), f"{an_id} is cut or wrapped at {width} columns:\n{text}"
    flat = " ".join(_words(text))
    for cell in _cells(renderable, width):
        for word in _words(cell):
            kept = _kept(word)
            assert kept in flat, f"{kept!r} of {cell!r} is broken at {width} columns:\n{text}"


def test_a_wide_terminal_gets_a_table_and_a_narrow_one_a_vertical_layout():
    timeline = render.timeline_table(_timeline())
    assert timeline.layout(80).kind == "vertical"
    assert timeline.layout(120).kind != "vertical" and timeline.layout(200).kind == "table"
    assert timeline.layout(200).hidden == ()
    wide = _render(timeline, 200)
    assert all(header in wide for header in ("status", "duration", "service"))
    narrow = _render(timeline, 80)
    assert narrow.count("id ") >= len(_ids())  # a block per row, a line per column


def _kept(word: str) -> str:
    """What of ``word`` must print together: all of it, the first 8 characters of a longer
    one, or 4 wide characters of Chinese text (which may break anywhere)."""
    if len(word) > LONGEST_WORD:
        return word[:MIN_CELL]
    if any(ord(ch) > 0x2E80 for ch in word):
        return word[:MIN_CELL // 2]
    return word


def test_columns_left_out_at_a_width_are_named_under_the_table():
    table = Table("id", "what", "status", "note")
    table.add_row(_ids()[0], "POST /v1/payments/charge", "error", "answered 503 PAYMENT_UNAVAILABLE after 55 ms")
    fitted = fit(table, ids={"id"}, optional=("note", "status"))
    layout = fitted.layout(80)
    assert layout.kind != "vertical" and layout.hidden, layout
    assert f"({', '.join(layout.hidden)} left out at this width)" in _render(fitted, 80)
