"""``supportlens demo``: a past day replayed through real Kafka and a real pipeline, then what it found.

The day (:mod:`supportlens.demo.day`) is ordinary traffic that warms the surge detector,
three outages back to back, one customer's misuse and the quiet night, on one event-time
line. Per scenario: the records sent against what landed, the requests the worker
correlated against the ground truth, and how its report diagnoses compare with the labels.
Per outage: the surge, the incident the policy declared (its rule, its delay after the fault
began), the VIP accounts told and what one of them read, the end announced. Then a person
declares and resolves an incident, and a drill replays the payment outage from ClickHouse,
its notices going only to the drill channel. At the end, the counts of all that, the
confusion table of the diagnoses, and what support staff would see in ClickHouse.

The pipeline runs as ``supportlens serve`` (worker, ClickHouse sink, support API) and
``supportlens notify`` in child processes, on a store and topics of the demo's own; the
customers' webhook endpoints and the drill channel are two signed-webhook receivers of
this process (:mod:`supportlens.demo.receiver`). Everything read from the topics is written
to the output directory (``events/*.jsonl``, ``webhooks.jsonl``, ``story.json``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timezone
from pathlib import Path

from pydantic import SecretStr
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sinks.notifications import READY_LINE as NOTIFY_READY
from sinks.run_summary import RECORD_TYPES, Observed, Score, accuracy_by_class, compare, observe, score
from supportlens import store
from supportlens.config import Settings
from supportlens.contracts import CLASSES, CorrelatedRequest, DiagnosedReport, decode
from supportlens.demo.day import Segment, plan_day
from supportlens.demo.incidents import (
    drill_the_outage, incidents_of_the_day, person_declares, print_counts, read_events, write_outputs,
)
from supportlens.demo.misuse import misuse_of_the_day
from supportlens.demo.receiver import WebhookReceiver
from supportlens.demo.story import mark
from supportlens.errors import UserError
from supportlens.fit import fit
from supportlens.serve import READY_LINE
from supportlens.simulator.labels import ReportLabel, RequestLabel, RunLabel, read_labels
from supportlens.support import render
from supportlens.support.access import RemoteSupport
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.simulator.scenarios import SCENARIOS
from supportlens.topic_reader import Offsets, end_offsets, read_range
from supportlens.topics import provision

# The world of the demo: the one the Kafka tests of incidents and VIP notices use.
SEED, USERS = 11, 3000
# The demo waits for requests whose other side never comes: a short grace keeps it brisk.
DEMO_TIMING = {"correlation_grace_s": 3.0, "correlation_settle_s": 0.5}
OUTPUTS = ("requests", "reports-diagnosed")
DEMO_NAMESPACE = "demo."


def run_demo(
    settings: Settings,
    console: Console,
    rate: float,
    window_s: int,
    out_dir: Path,
    progress: Callable[[], Progress],
) -> None:
    """Replay the day through Kafka and the pipeline; raise :class:`UserError` if anything is off.

    The demo works in its own namespace (``<topic prefix>demo.``): it never reads or writes
    the pipeline's real topics, whatever cluster the settings point at.
    """
    if window_s < 240:
        raise UserError(f"--window must be at least 240 simulated seconds, got {window_s}",
                        hint="an outage needs room to be declared, to end, and to be announced over")
    try:
        plan_day(datetime.now(timezone.utc), settings.surge_warmup_s, window_s)
    except ValueError as exc:
        raise UserError(str(exc), hint="give a shorter --window") from None
    settings = _demo_settings(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    with library_logs_to(out_dir / "demo.log"):
        _run(settings, console, rate, window_s, out_dir, progress)


@contextlib.contextmanager
def library_logs_to(path: Path) -> Iterator[None]:
    """Log records of this process (librdkafka's through ``supportlens.kafka``, the store's, ours)
    go to ``path``, not to the terminal: without a handler, Python prints warnings raw on stderr."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _run(settings: Settings, console: Console, rate: float, window_s: int, out_dir: Path,
         progress: Callable[[], Progress]) -> None:
    _clear_earlier_demos(settings, console)
    provision(settings)
    _fresh_store(settings)
    secret = secrets.token_urlsafe(24)
    with WebhookReceiver(secret) as customers, WebhookReceiver(secret) as drill_channel:
        settings = settings.model_copy(update={
            "notify_webhook_secret": SecretStr(secret), "drill_webhook_url": drill_channel.url("/drills"),
            "notify_metrics_port": 0, "notify_backoff_first_s": 0.5})
        day = plan_day(datetime.now(timezone.utc), settings.surge_warmup_s, window_s)
        console.print(
            f"[bold]supportlens demo[/]: the day of {day[0].start:%Y-%m-%d} replayed, {rate:g} requests/s at peak\n"
            f"  Kafka at {settings.kafka_bootstrap}, topics {settings.topic_prefix}*\n"
            f"  ClickHouse {store.redact_dsn(settings.clickhouse_dsn)}\n"
            f"  VIP accounts' webhooks at {customers.url('/hooks')}, the drill channel at {drill_channel.url('/drills')}"
        )
        log_path = out_dir / "serve.log"  # the pipeline's; this process's own lines go to demo.log
        serve = _start(settings, ["serve"], log_path, ("Worker ready", READY_LINE), console,
                       "starting the pipeline (worker, ClickHouse sink, support API)…")
        notify = None
        problems: list[str] = []
        try:
            notify = _start(settings, ["notify"], out_dir / "notify.log", (NOTIFY_READY,), console,
                            "starting notify (signed webhooks to the customers)…")
            processes = (serve, notify)
            runs, labels, results = _replay_day(settings, console, day, rate, out_dir, progress, customers, serve)
            for segment, run, (seen, result) in zip(day, runs, results):
                problems += _print_scenario(console, segment, run, seen, result)
            stories, story_problems = incidents_of_the_day(settings, console, runs, customers, processes)
            problems += story_problems
            problems += misuse_of_the_day(settings, console, runs, processes)
            problems += person_declares(settings, console)
            support = RemoteSupport(settings.support_url)
            correlated = sum(len(r.correlated) for _, r in results)
            problems += _wait_for_store(console, support, correlated, serve)
            problems += drill_the_outage(settings, console, support, stories, customers, drill_channel, processes)
            events = read_events(settings)  # once, for the files and the counts alike
            write_outputs(events, out_dir, stories, customers, drill_channel, SEED, USERS)
            print_counts(events, console, customers, drill_channel)
            _show_store(console, settings, support, labels, runs)
        finally:
            for process in (notify, serve):
                if process is not None:
                    process.terminate()
                    process.wait(60)
    report = _daily_report(settings, day[0].start.date(), out_dir)
    console.print(f"\nthe day's complaint report: [bold]{report}[/] (and .md beside it; "
                  f"`supportlens report daily --date {day[0].start.date()}` writes it again)")

    for title, confusion in (("report diagnoses", sum((r.reports for _, r in results), Counter())),
                             ("request diagnoses", sum((r.requests for _, r in results), Counter()))):
        # a heading of its own: a table title would wrap whenever the table is narrower than it
        console.print(f"\n[bold]{title}, the whole day[/] (rows: expected, columns: diagnosed)")
        console.print(fit(_confusion_table(confusion)))
    if problems:
        raise UserError("; ".join(problems), hint=f"the pipeline's logs are {log_path} and {out_dir / 'notify.log'}")
    console.print("[green]Every record landed, every request was correlated, every report diagnosed; every outage "
                  f"was declared, announced over and told to its VIP accounts, and the quiet night stayed quiet.[/] "
                  f"Files: {out_dir}/")
    env = f"SUPPORTLENS_CLICKHOUSE_DSN={settings.clickhouse_dsn} SUPPORTLENS_CLICKHOUSE_DATABASE={settings.clickhouse_database}"
    console.print(f"Look around yourself: [bold]{env} supportlens top --by region --since 2d[/]")


def _demo_settings(settings: Settings) -> Settings:
    """Own topics, own store, a free port for the support API: the demo never touches the real pipeline.

    Each run has a namespace of its own, ``<topic prefix>demo.<run>.``, topics, consumer groups and
    the worker's state included: the day is replayed in the past, and what an earlier (perhaps
    interrupted) demo left behind would have moved the worker's clock past it. Earlier runs'
    topics are deleted (:func:`_clear_earlier_demos`).
    """
    import socket

    with socket.socket() as sock:
        sock.bind((settings.support_host, 0))
        port = sock.getsockname()[1]
    run = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    update = {**DEMO_TIMING, "topic_prefix": f"{settings.topic_prefix}{DEMO_NAMESPACE}{run}.", "support_port": port,
              "support_url": f"http://{settings.support_host}:{port}"}
    if settings.embedded_store:
        update["clickhouse_dsn"] = f"chdb://{settings.state_dir / 'demo-clickhouse'}"
    else:
        update["clickhouse_database"] = f"{settings.clickhouse_database}_demo"
    return settings.model_copy(update=update)


def _clear_earlier_demos(settings: Settings, console: Console) -> None:
    """Delete the topics of earlier demo runs (``<topic prefix>demo.*``, never another name)."""
    from confluent_kafka.admin import AdminClient

    namespace = settings.topic_prefix.rsplit(".", 2)[0] + "."  # <topic prefix>demo.
    admin = AdminClient(settings.kafka_config())
    earlier = [t for t in admin.list_topics(timeout=30).topics
               if t.startswith(namespace) and not t.startswith(settings.topic_prefix)]
    if not earlier:
        return
    for future in admin.delete_topics(earlier, operation_timeout=30).values():
        with contextlib.suppress(Exception):  # already gone, or being deleted by a demo beside us
            future.result(timeout=60)
    console.print(f"(deleted {len(earlier)} topics of earlier demo runs under {namespace})")


def _fresh_store(settings: Settings) -> None:
    """Start every demo from an empty store (the demo's own, see :func:`_demo_settings`)."""
    if settings.embedded_store:
        shutil.rmtree(settings.clickhouse_dsn.removeprefix("chdb://"), ignore_errors=True)
    else:
        store.connect(settings).command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")


def _start(settings: Settings, verb: list[str], log_path: Path, ready: Sequence[str], console: Console,
           status: str) -> subprocess.Popen[bytes]:
    """A supportlens child process, its output in ``log_path``, once its ready lines are there."""
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "supportlens", *verb], env=settings.as_env() | _base_env(),
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    with console.status(status):
        while not all(line.encode() in log_path.read_bytes() for line in ready):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise UserError(f"`supportlens {' '.join(verb)}` did not start; see {log_path}")
            time.sleep(0.2)
    return process


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}


def _replay_day(settings: Settings, console: Console, day: list[Segment], rate: float, out_dir: Path,
                progress: Callable[[], Progress], customers: WebhookReceiver, serve: subprocess.Popen[bytes],
                ) -> tuple[list[RunLabel], list, list[tuple[Observed, Score]]]:
    """Send the whole day, segment after segment with no pause between them (a pause would let the
    worker's clock run on to now, past the segments still to come), then read back what landed."""
    inputs = [settings.topic(t) for t in RECORD_TYPES]
    outputs = [settings.topic(t) for t in OUTPUTS]
    marks = [end_offsets(settings, inputs + outputs)]
    runs, per_run_labels = [], []
    with progress() as bar:
        tasks = [bar.add_task(f"{s.start:%H:%M} {s.scenario:<15}", total=s.duration_s, sent=0) for s in day]
        for segment, task in zip(day, tasks):
            options = SimulateOptions(segment.scenario, rate, segment.duration_s, seed=SEED, users=USERS, speed=0,
                                      start=segment.start, labels_path=out_dir / f"{segment.scenario}.labels.jsonl",
                                      vip_webhooks=customers.url("/hooks"))
            runs.append(simulate(settings, options,
                                 lambda done, _t, sent, task=task: bar.update(task, completed=done, sent=sent)))
            marks.append(end_offsets(settings, inputs))
    logical = {settings.topic(t): t for t in RECORD_TYPES}
    seen = []
    for before, after in zip(marks, marks[1:]):
        start = {tp: o for tp, o in before.items() if tp[0] in logical}
        seen.append(observe(((logical[m.topic()], m.value()) for m in read_range(settings, start, after)),
                            settings.max_record_bytes))
    for run in runs:
        per_run_labels.append(list(read_labels(out_dir / f"{run.scenario}.labels.jsonl")))
    labels = [label for run_labels in per_run_labels for label in run_labels]
    requests, reports = _await_outputs(settings, marks[0], labels, serve, console)
    results = []
    for observed, run_labels in zip(seen, per_run_labels):
        ids = {label.request_id for label in run_labels if isinstance(label, RequestLabel)}
        report_ids = {label.report_id for label in run_labels if isinstance(label, ReportLabel)}
        results.append((observed, score(run_labels, [r for r in requests if r.request_id in ids],
                                        [r for r in reports if r.report_id in report_ids])))
    known = {label.request_id for label in labels if isinstance(label, RequestLabel)}
    earlier = len({r.request_id for r in requests} - known)
    if earlier:
        console.print(f"({earlier:,} requests of earlier runs were correlated meanwhile; not counted as this day's)")
    return runs, labels, results


def _await_outputs(settings: Settings, before: Offsets, labels: list, worker: subprocess.Popen[bytes],
                   console: Console, stall_s: float = 60.0) -> tuple[list[CorrelatedRequest], list[DiagnosedReport]]:
    """Read the worker's outputs until every expected request and report is there and nothing new
    came for a moment (a later version of a request may still be on its way).

    Gives up only when the worker stops making progress for ``stall_s`` (a worker still
    catching up on a backlog is progress) or exits.
    """
    quiet_s = DEMO_TIMING["correlation_settle_s"] + DEMO_TIMING["correlation_grace_s"] + 0.5
    positions = {tp: offset for tp, offset in before.items() if tp[0] in {settings.topic(t) for t in OUTPUTS}}
    requests_topic = settings.topic("requests")
    requests: list[CorrelatedRequest] = []
    reports: list[DiagnosedReport] = []
    expected = score(labels, [], [])
    missing_requests, missing_reports = set(expected.expected_requests), set(expected.expected_reports)
    last_change = time.monotonic()
    with console.status("the worker correlates the day…"):
        while True:
            fresh = 0
            for message in read_range(settings, positions):
                positions[(message.topic(), message.partition())] = message.offset() + 1
                fresh += 1
                if message.topic() == requests_topic:
                    request = decode(message.value(), CorrelatedRequest)
                    requests.append(request)
                    missing_requests.discard(request.request_id)
                else:
                    report = decode(message.value(), DiagnosedReport)
                    reports.append(report)
                    missing_reports.discard(report.report_id)
            if fresh:
                last_change = time.monotonic()
            idle = time.monotonic() - last_change
            if (not missing_requests and not missing_reports and idle >= quiet_s) or idle > stall_s \
                    or worker.poll() is not None:
                return requests, reports
            time.sleep(1.0)


def _print_scenario(console: Console, segment: Segment, run: RunLabel, seen: Observed, result: Score) -> list[str]:
    console.print(f"\n[bold cyan]{run.scenario}[/] ({segment.start:%H:%M}–{segment.end:%H:%M} UTC): "
                  f"{SCENARIOS[run.scenario].description}")
    table = Table("topic", "sent (truth)", "read back", show_edge=False, box=None, padding=(0, 2))
    for row in compare(run, seen):
        table.add_row(row.topic, f"{row.expected:,}", f"{row.seen:,} {mark(row.ok)}")
    console.print(fit(table, ids={"topic"}))
    problems = [f"{run.scenario}: {row.topic} sent {row.expected}, read {row.seen}" for row in compare(run, seen) if not row.ok]
    console.print(
        f"  correlated [bold]{len(result.correlated):,}[/] of {len(result.expected_requests):,} requests "
        f"{mark(result.requests_complete)} · diagnosed {len(result.diagnosed):,} of {len(result.expected_reports):,} "
        f"reports {mark(result.reports_complete)}"
    )
    if not result.requests_complete:
        problems.append(f"{run.scenario}: {len(result.correlated)} of {len(result.expected_requests)} requests correlated")
    if not result.reports_complete:
        problems.append(f"{run.scenario}: {len(result.diagnosed)} of {len(result.expected_reports)} reports diagnosed")
    accuracy = accuracy_by_class(result.reports)
    if accuracy:
        parts = [f"{cls} {right}/{total} {mark(right == total)}" for cls, (right, total) in accuracy.items()]
        console.print("  report diagnoses right, by expected class: " + ", ".join(parts))
    for incident in run.expected_incidents:
        dims = ", ".join(f"{k}={v}" for k, v in incident.dimension.items())
        console.print(f"  expected incident: {incident.expected_class} on {dims}")
    example = next((r for r in result.diagnosed.values() if r.diagnosis.cls == SCENARIOS[run.scenario].expected_class), None)
    if example is not None:
        console.print(f"  a user ({example.locale}) is told: [italic]{example.title}[/] — {example.action}")
    for reason, n in seen.invalid.most_common(3):
        console.print(f"  [red]invalid records[/]: {n} × {reason}")
    return problems


def _wait_for_store(console: Console, support: RemoteSupport, correlated: int,
                    serve: subprocess.Popen[bytes]) -> list[str]:
    """Wait for the sink to store what the worker wrote (the drill replays from it)."""
    last, since = -1, time.monotonic()
    with console.status("waiting for ClickHouse to hold every request…"):
        while True:
            rows = support.table_counts().rows["requests"]
            if rows != last:
                last, since = rows, time.monotonic()
            if rows >= correlated and time.monotonic() - since > 2:
                return []
            if time.monotonic() - since > 60 or serve.poll() is not None:
                return [f"ClickHouse holds {rows} requests, the worker correlated {correlated}"]
            time.sleep(0.5)


def _daily_report(settings: Settings, day: date, out_dir: Path) -> Path:
    """The daily complaint report of the replayed day, from the store ``serve`` has just let go of."""
    from supportlens.reports.write import write_daily
    from supportlens.store.daily import daily_figures

    figures = daily_figures(store.connect(settings, create_database=False), day)
    return write_daily(figures, "en", settings.clickhouse_database, out_dir)[0]


def _show_store(console: Console, settings: Settings, support: RemoteSupport, labels: list,
                runs: list[RunLabel]) -> None:
    """What support staff would see in ClickHouse."""
    counts = support.table_counts()
    console.print()
    console.print(render.counts_table(counts, f"{settings.clickhouse_database} after the demo"))
    requests = {label.request_id: label for label in labels if isinstance(label, RequestLabel)}
    report = next((label for label in labels if isinstance(label, ReportLabel)
                   and label.scenario == "service-outage" and label.expected_class == "server_error"
                   and label.request_ids and label.request_ids[0] in requests), None)
    since_us = min(run.start_us for run in runs) - 60_000_000
    until_us = max(max(run.end_us for run in runs), time.time_ns() // 1000) + 60_000_000
    if report is not None:
        customer = requests[report.request_ids[0]]
        console.print(f"\n[bold]supportlens lookup --ip {customer.client_ip}[/]: a customer who reported the outage")
        outage = next(run for run in runs if run.scenario == "service-outage")  # not the drill's replay of it
        console.print(render.timeline_table(support.timeline("ip", customer.client_ip, outage.start_us,
                                                             outage.end_us, 20)))
        console.print(f"\n[bold]supportlens lookup --request {customer.request_id}[/]: the request they reported")
        console.print(render.chain_view(support.request_chain(customer.request_id)))
    console.print("\n[bold]supportlens top --by service[/]: the problems of the whole run")
    console.print(render.top_table(support.top_problems("service", since_us, until_us, 10)))


SHORT = {"network_unreachable": "unreach", "network_slow": "net-slow", "server_error": "srv-err",
         "server_slow": "srv-slow", "client_misuse": "misuse", "client_crash": "crash", "ok": "ok", "unknown": "unknown"}


def _confusion_table(confusion: Counter[tuple[str, str]]) -> Table:
    """Rows: the class the ground truth expects; columns: what the worker diagnosed."""
    present = [c for c in CLASSES if any(c in pair for pair in confusion)]
    table = Table("expected", *(SHORT[c] for c in present),
                  caption=", ".join(f"{SHORT[c]} = {c}" for c in present if SHORT[c] != c))
    for expected in present:
        cells = []
        for got in present:
            n = confusion.get((expected, got), 0)
            cells.append("" if not n else f"[green]{n:,}[/]" if got == expected else f"[red]{n:,}[/]")
        table.add_row(SHORT[expected], *cells)
    return table


