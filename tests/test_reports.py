"""The daily complaint report (issue #16) from real ClickHouse, filled from a simulated day.

The day (yesterday): a payment outage and one customer's misuse wave, after a normal day a
week's baseline earlier; replayed through the pipeline's pure functions (correlation,
diagnosis, surge detection, declaration policy, VIP notices) and stored through the sink's row
mapping. The report's figures are checked against the simulator's ground truth; the HTML is
opened in headless Chromium, which must log nothing to its console and draw every chart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from helpers import insert_records, own_database, supportlens_cmd
from streams.catalog import load_catalog
from streams.correlate import add_span, build_request
from streams.detect import EngineConfig, SurgeEngine
from streams.diagnose import diagnose_report, primary_request_id
from streams.incidents import load_policy
from streams.notices import Notifier, load_templates
from streams.offline import replay
from streams.surge import SurgeParams
from supportlens.config import load_settings
from supportlens.contracts import BehaviourEvent, FaultReport, Span
from supportlens.reports import html, markdown
from supportlens.reports.document import daily_document
from supportlens.reports.write import write_daily
from supportlens.simulator.behaviour import STUCK
from supportlens.simulator.generate import Plan, Simulation
from supportlens.simulator.labels import ReportLabel
from supportlens.simulator.scenarios import scenario
from supportlens.simulator.world import build_world
from supportlens.store.daily import daily_figures
from supportlens.store.lookup import LookupInputError

pytestmark = pytest.mark.clickhouse

US = 1_000_000
SEED, USERS, RATE = 11, 3000, 80
CATALOG = load_catalog()
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Day:
    client: Any
    database: str
    day: date
    report_truth: Counter[str]  # expected class of each fault report of the day (the simulator's labels)
    diagnosed: Counter[str]  # the class each was diagnosed with (what the store holds)
    untraced: Counter[str]  # the offline diagnoses of the day's sequence-misuse reports (truth: client_misuse)
    failed_by_problem: Counter[tuple[str, str]]  # (class, service) of the day's correlated failed requests
    requests: int
    incidents: dict[str, Any]  # declared incident events of the day, by id
    told: dict[str, set[str]]  # incident id -> VIP accounts told
    advice: list[str]  # accounts given misuse advice


@pytest.fixture(scope="module")
def filled(clickhouse_target, tmp_path_factory) -> Day:
    today = datetime.now(timezone.utc).date()
    day = today - timedelta(days=1)
    at = lambda d, h, m=0: int(datetime(d.year, d.month, d.day, h, m, tzinfo=timezone.utc).timestamp()) * US  # noqa: E731
    plans = [Plan(scenario("normal"), RATE, 600, SEED, at(day - timedelta(days=7), 7, 30)),  # the baseline week
             Plan(scenario("normal"), RATE, 900, SEED, at(day, 7, 30)),  # warms the detector
             Plan(scenario("service-outage"), RATE, 300, SEED, at(day, 7, 45)),
             Plan(scenario("misuse-wave"), RATE, 300, SEED, at(day, 7, 50))]
    world = build_world(SEED, USERS)
    notifier = Notifier(load_templates(), CATALOG, "")
    config = EngineConfig(SurgeParams())
    engine = SurgeEngine(config, load_policy(), CATALOG.team_of, notifier=notifier, accounts={})
    settings, client = own_database(clickhouse_target.dsn, tmp_path_factory.mktemp("reports-state"))
    truth: Counter[str] = Counter()
    diagnosed: Counter[str] = Counter()
    untraced: Counter[str] = Counter()
    failed: Counter[tuple[str, str]] = Counter()
    requests_of_day = 0
    incidents, told, advice = {}, {}, []
    for plan in plans:
        simulation = Simulation(plan, world)
        records = [(e.ts_us, e.record) for e in simulation.accounts()]
        labels = []
        for tick in simulation.ticks():
            records += [(e.ts_us, e.record) for e in tick.events]
            labels += tick.labels
        pending: dict[str, Any] = {}
        for _, record in records:
            if isinstance(record, Span):
                pending[record.request_id], _ = add_span(pending.get(record.request_id), record, 0.0)
        requests = [build_request(rid, state, CATALOG) for rid, state in pending.items()]
        reports = [r for _, r in records if isinstance(r, FaultReport)]
        by_id = {r.request_id: r for r in requests}
        out = replay(records, CATALOG, load_policy(), config, engine=engine)
        insert_records(client, "requests", requests)
        insert_records(client, "fault-reports", reports)
        diagnoses = [diagnose_report(r, by_id.get(primary_request_id(r)), CATALOG, r.received_at_us + 2 * US)
                     for r in reports]
        insert_records(client, "reports-diagnosed", diagnoses)
        insert_records(client, "surges", out.surges)
        insert_records(client, "incidents", out.incidents)
        insert_records(client, "notifications", out.notifications)
        insert_records(client, "behaviour", [r for _, r in records if isinstance(r, BehaviourEvent)])
        if plan.start_us >= at(day, 0):
            truth += Counter(label.expected_class for label in labels if isinstance(label, ReportLabel))
            diagnosed += Counter(d.diagnosis.cls for d in diagnoses)
            episodes = {e.report_id for e in simulation.summary().sequence_misuse.episodes}
            untraced += Counter(d.diagnosis.cls for d in diagnoses if d.report_id in episodes)
            failed += Counter((r.diagnosis.cls, r.diagnosis.service or r.root_service) for r in requests
                              if r.diagnosis.cls != "ok")
            requests_of_day += len(requests)
            for event in out.incidents:
                if event.transition == "declared":
                    incidents[event.incident_id] = event
            for notice in out.notifications:
                if notice.kind == "incident_declared":
                    told.setdefault(notice.incident_id, set()).add(notice.account_id)
                elif notice.kind == "misuse_advice":
                    advice.append(notice.account_id)
    return Day(client, settings.clickhouse_database, day, truth, diagnosed, untraced, failed, requests_of_day, incidents, told, advice)


def test_the_daily_figures_match_the_simulated_day(filled):
    figures = daily_figures(filled.client, filled.day)
    assert figures.day == filled.day.isoformat()
    assert figures.reports == sum(filled.report_truth.values())
    assert {c.value: c.count for c in figures.reports_by_class} == dict(filled.diagnosed)
    # The offline path (streams/offline.py) does not trace sequences: a sequence-misuse report is
    # diagnosed as the payment failure it looks like, not the misuse it is (the stream traces
    # it, tested on Kafka). Those are left out of the comparison with the truth.
    assert filled.untraced and set(filled.untraced) == {"server_error"}
    truth = filled.report_truth - Counter({"client_misuse": filled.untraced.total()})
    right = sum(min(n, (filled.diagnosed - filled.untraced)[cls]) for cls, n in truth.items())
    assert right >= 0.95 * truth.total()  # and the diagnoses are the simulator's truth, but for a few
    # uniq() is exact below 65,536 distinct values and within about 1 % above (the dashboards' own count)
    assert figures.requests == pytest.approx(filled.requests, rel=0.01)
    assert figures.failed_requests == sum(filled.failed_by_problem.values())
    top = figures.problems[0]
    assert (top.diagnosis_class, top.service) == ("server_error", "payment")
    assert top.requests == filled.failed_by_problem[("server_error", "payment")] and top.trend == "grown"
    assert 0 < top.baseline_daily < top.requests / 10  # the week before had the background noise only
    assert figures.undiagnosed == 0 and figures.diagnosis_p50_s == pytest.approx(2.0)
    assert figures.answered == figures.reports - filled.diagnosed.get("unknown", 0)
    # the day's incidents: the payment outage, declared and resolved, and the VIP accounts told of it
    assert [i.incident_id for i in figures.incidents] == list(filled.incidents)
    [outage] = figures.incidents
    assert outage.root_key == "service=payment" and outage.resolved_at_us and outage.declared_by == "policy"
    assert outage.declared_at_us == filled.incidents[outage.incident_id].at_us
    assert outage.accounts_told == len(filled.told[outage.incident_id]) > 0
    assert [a.account_id for a in figures.advice] == filled.advice and len(filled.advice) == 1


def test_a_day_with_nothing_recorded_and_a_day_in_the_future_are_clear_errors(filled):
    with pytest.raises(LookupInputError, match="nothing was recorded on"):
        daily_figures(filled.client, filled.day - timedelta(days=3))
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    for args, words in ((["--date", tomorrow], "is in the future"), (["--date", "2026-13-01"], "is not a day"),
                        (["--locale", "fr"], "no report in locale"), (["--format", "pdf"], "unknown format")):
        done = subprocess.run(supportlens_cmd("report", "daily", *args), capture_output=True, text=True, timeout=60,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")},
                                   "COLUMNS": "200"})
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
def test_the_report_pages_say_the_same_in_html_and_markdown(filled, locale, tmp_path):
    figures = daily_figures(filled.client, filled.day)
    document = daily_document(figures, locale, filled.database)
    text, page = markdown.render(document), html.render(document)
    [outage] = figures.incidents
    for rendered in (text, page):
        assert outage.incident_id in rendered and f"{figures.reports:,}" in rendered
        assert ("投诉日报" if locale == "zh-CN" else "Daily complaint report") in rendered
    assert page.count('class="plotly-graph-div"') == sum(1 for s in document.sections if s.chart)
    paths = write_daily(figures, locale, filled.database, tmp_path)
    again = write_daily(figures, locale, filled.database, tmp_path)
    assert paths == again and [p.name for p in paths] == [f"daily-{figures.day}.{locale}.html",
                                                            f"daily-{figures.day}.{locale}.md"]


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
def test_headless_chromium_opens_the_report_without_console_errors_and_draws_every_chart(filled, locale):
    from PIL import Image

    assert shutil.which("chromium"), "deploy/local/services.sh (make test) installs chromium"

    figures = daily_figures(filled.client, filled.day)
    out = ROOT / "out" / "reports-test"
    [page] = write_daily(figures, locale, filled.database, out, ("html",))
    shot = out / f"daily.{locale}.png"
    chrome = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--window-size=1280,4200", "--virtual-time-budget=8000", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={out / f'chromium-{locale}'}"]
    dom = subprocess.run([*chrome, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    document = daily_document(figures, locale, filled.database)
    expected = [s.chart.chart_id for s in document.sections if s.chart]
    for name in expected:
        # the chart's drawn part: from its div to the next section; its bars are paths plotly drew
        drawn = dom.stdout.split(f'<div id="chart-{name}"', 1)[1].split("</section>", 1)[0]
        bars = re.findall(r'<g class="point"><path d="M[\d.]+,([\d.]+)V([\d.]+)H', drawn)
        assert bars and all(float(base) > float(top) for base, top in bars), f"chart {name}: no bars drawn"
    done = subprocess.run([*chrome, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    bar_blue = dict((color, n) for n, color in image.getcolors(maxcolors=1 << 24)).get((62, 124, 177), 0)
    assert bar_blue > 20_000, f"{bar_blue} pixels of bar colour in {shot}"  # the bars are drawn, not blank boxes


def test_the_support_api_serves_the_same_figures_and_refuses_a_bad_day(filled):
    import asyncio

    import msgspec
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client import CollectorRegistry

    from supportlens.store.account_report import AccountFigures, account_figures
    from supportlens.store.daily import DailyFigures
    from supportlens.store.perception import PerceptionFigures, perception_figures
    from supportlens.support.access import DirectSupport
    from supportlens.support.api import build_support_app

    async def scenario() -> None:
        app = build_support_app(DirectSupport(filled.client), CollectorRegistry())
        async with TestClient(TestServer(app)) as http:
            ok = await http.get("/v1/reports/daily", params={"day": filled.day.isoformat()})
            assert ok.status == 200
            assert msgspec.json.decode(await ok.read(), type=DailyFigures) == daily_figures(filled.client, filled.day)
            week = await http.get("/v1/reports/perception", params={"period": "week", "day": filled.day.isoformat()})
            assert week.status == 200 and msgspec.json.decode(await week.read(), type=PerceptionFigures) == \
                perception_figures(filled.client, "week", filled.day)
            [account] = filled.advice
            mine = await http.get("/v1/reports/account", params={"account": account, "period": "week",
                                                                 "day": filled.day.isoformat()})
            assert mine.status == 200 and msgspec.json.decode(await mine.read(), type=AccountFigures) == \
                account_figures(filled.client, account, "week", filled.day)
            unknown = await http.get("/v1/reports/account", params={"account": "acct-99999", "day": filled.day.isoformat()})
            assert unknown.status == 400 and "no account" in (await unknown.json())["error"]
            bad_period = await http.get("/v1/reports/perception", params={"period": "year", "day": filled.day.isoformat()})
            assert bad_period.status == 400 and "no 'year' period" in (await bad_period.json())["error"]
            for day, words in (("someday", "is not a day"), ((filled.day - timedelta(days=3)).isoformat(), "nothing")):
                bad = await http.get("/v1/reports/daily", params={"day": day})
                assert bad.status == 400 and words in (await bad.json())["error"]

    asyncio.run(scenario())


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
def test_the_report_arrives_by_email_with_a_plain_text_and_an_html_part_in_its_locale(filled, locale, tmp_path):
    from email import message_from_bytes, policy

    from mailbox_server import running_mailbox
    from supportlens.reports.mail import send_report
    from supportlens.reports.write import write_report

    figures = daily_figures(filled.client, filled.day)
    document = daily_document(figures, locale, filled.database)
    [page] = write_report(document, f"daily-{figures.day}", tmp_path, ("html",))
    with running_mailbox() as (mailbox, port):
        settings = load_settings(smtp_host="127.0.0.1", smtp_port=port, report_recipients=["leads@example.com"])
        assert send_report(settings, document, f"daily-{figures.day}", page) == ["leads@example.com"]
        send_report(settings, document, f"daily-{figures.day}", page)  # a rerun for the same day
        # an account report goes to the account's service manager instead
        assert send_report(settings, document, "x", None, ["sm@vendor.example"]) == ["sm@vendor.example"]
    (_, to, raw), (_, _, again), (_, manager, _) = mailbox.mails
    assert manager == ["sm@vendor.example"]
    mail = message_from_bytes(raw, policy=policy.default)
    assert to == ["leads@example.com"] and mail["Content-Language"] == locale
    assert mail["Message-ID"] == message_from_bytes(again, policy=policy.default)["Message-ID"]  # one message twice
    assert mail["Subject"] == document.title
    plain = mail.get_body(preferencelist=("plain",)).get_content()
    body = mail.get_body(preferencelist=("html",)).get_content()
    [outage] = figures.incidents
    for part in (plain, body):
        assert outage.incident_id in part and ("投诉日报" if locale == "zh-CN" else "Daily complaint report") in part
    assert "<script" not in body and "<table>" in body  # no script runs in a mail client: tables instead
    [attachment] = list(mail.iter_attachments())
    assert attachment.get_filename() == page.name and b"plotly" in attachment.get_content().encode()


def test_email_without_recipients_is_a_clear_error():
    done = subprocess.run(supportlens_cmd("report", "daily", "--email"), capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")},
                               "COLUMNS": "200"})
    assert done.returncode == 2 and "no one to send the report to" in done.stderr and "Traceback" not in done.stderr


def test_the_weekly_perception_report_compares_the_week_with_the_one_before(filled, tmp_path):
    from supportlens.reports.document import perception_document
    from supportlens.reports.write import write_report
    from supportlens.store.perception import perception_figures

    week = perception_figures(filled.client, "week", filled.day)
    daily = daily_figures(filled.client, filled.day)
    assert (week.first_day, week.last_day) == ((filled.day - timedelta(days=6)).isoformat(), filled.day.isoformat())
    assert [d.day for d in week.days][-1] == daily.day and len(week.days) == 7
    assert week.days[-1].requests == daily.requests and all(d.requests == 0 for d in week.days[:-1])
    assert week.totals.reports == daily.reports and week.before.requests > 0  # the baseline day, a week earlier
    assert week.totals.diagnosed == daily.reports and week.totals.answered == daily.answered
    top = week.grown[0]
    assert (top.diagnosis_class, top.service) == ("server_error", "payment")
    assert top.requests == filled.failed_by_problem[("server_error", "payment")] > 10 * top.before > 0
    assert [i.incident_id for i in week.incidents] == [i.incident_id for i in daily.incidents]
    assert week.catalogue and week.catalogue[0].diagnosis_class == "server_error"
    # where users get stuck: the simulator's stuck step (one app version on one platform), against the baseline week
    stuck = STUCK
    checkout = next(f for f in week.funnels if f.funnel == stuck.funnel)
    assert checkout.entered > 100 and checkout.completed_before is not None and checkout.drop_step != stuck.step
    assert [(s.app_version, s.platform, s.drop_step) for s in checkout.stuck] == [
        (stuck.app_version, stuck.platform, stuck.step)]
    assert all(not f.stuck for f in week.funnels if f.funnel != stuck.funnel)
    month = perception_figures(filled.client, "month", filled.day)
    assert month.first_day == filled.day.replace(day=1).isoformat() and month.last_day == filled.day.isoformat()
    with pytest.raises(LookupInputError, match="no 'year' period"):
        perception_figures(filled.client, "year", filled.day)
    with pytest.raises(LookupInputError, match="nothing was recorded"):
        perception_figures(filled.client, "week", filled.day - timedelta(days=20))
    for locale in ("en", "zh-CN"):
        document = perception_document(week, locale, filled.database)
        [page, text] = write_report(document, f"perception-week-{week.last_day}", tmp_path)
        assert top.service in text.read_text(encoding="utf-8") and "plotly" in page.read_text(encoding="utf-8")
        said = {"en": f"{stuck.app_version} on {stuck.platform}: ", "zh-CN": f"{stuck.platform} 上的 {stuck.app_version}："}
        assert said[locale] in text.read_text(encoding="utf-8") and stuck.step in text.read_text(encoding="utf-8")
    assert shutil.which("chromium"), "deploy/local/services.sh (make test) installs chromium"
    dom = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
                          "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium'}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "CONSOLE" not in dom.stderr
    # the three day series are drawn as lines (plotly merges collinear points), rising on the outage day
    lines = re.findall(r'<path class="js-line" d="M[\d.]+,([\d.]+)(?:L[\d.]+,[\d.]+)*L[\d.]+,([\d.]+)"', dom.stdout)
    assert len(lines) == 3 and all(float(first) > float(last) for first, last in lines), lines


def test_the_account_report_tells_one_customers_story_and_refuses_an_unknown_account(filled, tmp_path):
    from supportlens.reports.document import account_document
    from supportlens.reports.write import write_report
    from supportlens.store.account_report import account_figures

    [account] = filled.advice  # the misuse wave's VIP customer, also hurt by the payment outage
    figures = account_figures(filled.client, account, "week", filled.day)
    assert 0 < figures.failed_requests < figures.requests and figures.everyone_requests > figures.requests
    told = {incident for incident, accounts in filled.told.items() if account in accounts}
    assert told and {n.incident_id for n in figures.notices} == told
    assert all(n.told_at_us and n.followed_up_at_us and n.told_at_us < n.followed_up_at_us for n in figures.notices)
    assert figures.misuse[0].value == "ORDER_BEFORE_LOGIN" and len(figures.advice) == 1
    assert all(r.diagnosis_class in ("", "unknown") for r in figures.open_reports)
    other = next(a for accounts in filled.told.values() for a in sorted(accounts) if a != account)
    assert account_figures(filled.client, other, "week", filled.day).advice == []
    with pytest.raises(LookupInputError, match="no account 'acct-99999'"):
        account_figures(filled.client, "acct-99999", "week", filled.day)
    for locale in ("en", "zh-CN"):
        [page, text] = write_report(account_document(figures, locale, filled.database),
                                    f"account-{account}-week-{figures.last_day}", tmp_path)
        assert "ORDER_BEFORE_LOGIN" in text.read_text(encoding="utf-8") and account in page.read_text(encoding="utf-8")
