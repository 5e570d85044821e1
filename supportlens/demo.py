"""``supportlens demo``: every scripted scenario through real Kafka and a real worker, then what it found.

Per scenario: the records sent against what landed, the requests the worker correlated
against the ground truth, and how its report diagnoses compare with the labels. At the
end, the confusion table of all report diagnoses, and what support staff would see in
ClickHouse: the lookup of one customer hit by the outage and the top problems of the run.

The pipeline runs as ``supportlens serve`` (worker, ClickHouse sink, support API) in a
child process, on a store of the demo's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sinks.run_summary import RECORD_TYPES, Observed, Score, accuracy_by_class, compare, observe, score
from supportlens import store
from supportlens.config import Settings
from supportlens.contracts import CLASSES, CorrelatedRequest, DiagnosedReport, decode
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

DEMO_SCENARIOS = ("service-outage", "isp-outage", "bad-release", "misuse-wave", "quiet-night")
# The demo waits for requests whose other side never comes: a short grace keeps it brisk.
DEMO_TIMING = {"correlation_grace_s": 3.0, "correlation_settle_s": 0.5}
OUTPUTS = ("requests", "reports-diagnosed")


def run_demo(
    settings: Settings,
    console: Console,
    rate: float,
    duration_s: int,
    out_dir: Path,
    progress: Callable[[], Progress],
) -> None:
    """Run the scenarios through Kafka and a worker; raise :class:`UserError` if anything is off.

    The demo works in its own namespace (``<topic prefix>demo.``): it never reads or writes
    the pipeline's real topics, whatever cluster the settings point at.
    """
    settings = _demo_settings(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    with library_logs_to(out_dir / "demo.log"):
        _run(settings, console, rate, duration_s, out_dir, progress)


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


def _run(settings: Settings, console: Console, rate: float, duration_s: int, out_dir: Path,
         progress: Callable[[], Progress]) -> None:
    provision(settings)
    _fresh_store(settings)
    _sink_from_now_on(settings)
    console.print(
        f"[bold]supportlens demo[/]: {len(DEMO_SCENARIOS)} scenarios, {rate:g} requests/s at peak, "
        f"{duration_s} simulated seconds each, Kafka at {settings.kafka_bootstrap}, "
        f"ClickHouse {store.redact_dsn(settings.clickhouse_dsn)}"
    )
    log_path = out_dir / "serve.log"  # the pipeline's; this process's own lines go to demo.log
    worker = _start_serve(settings, log_path, console)
    problems: list[str] = []
    results: list[tuple[RunLabel, Score]] = []
    labels: list = []
    try:
        for name in DEMO_SCENARIOS:
            inputs = [settings.topic(t) for t in RECORD_TYPES]
            outputs = [settings.topic(t) for t in OUTPUTS]
            before = end_offsets(settings, inputs + outputs)
            options = SimulateOptions(name, rate, duration_s, speed=0, labels_path=out_dir / f"{name}.labels.jsonl")
            with progress() as bar:
                task = bar.add_task(f"{name:<15}", total=duration_s, sent=0)
                run = simulate(settings, options, lambda done, _t, sent: bar.update(task, completed=done, sent=sent))
            logical = {settings.topic(t): t for t in RECORD_TYPES}
            seen = observe(((logical[m.topic()], m.value()) for m in read_range(
                settings, {tp: o for tp, o in before.items() if tp[0] in logical})), settings.max_record_bytes)
            run_labels = list(read_labels(options.labels_path))
            labels += run_labels
            result = _await_outputs(settings, before, run_labels, worker)
            results.append((run, result))
            problems += _print_scenario(console, settings, run, seen, result)
        correlated = sum(len(r.correlated) for _, r in results)
        problems += _show_store(console, settings, labels, [run for run, _ in results], correlated, worker)
    finally:
        worker.terminate()
        worker.wait(60)

    for title, confusion in (("report diagnoses", sum((r.reports for _, r in results), Counter())),
                             ("request diagnoses", sum((r.requests for _, r in results), Counter()))):
        # a heading of its own: a table title would wrap whenever the table is narrower than it
        console.print(f"\n[bold]{title}, all scenarios[/] (rows: expected, columns: diagnosed)")
        console.print(fit(_confusion_table(confusion)))
    if problems:
        raise UserError("; ".join(problems), hint=f"the pipeline's log is {log_path}")
    console.print("[green]Every record landed, every request was correlated, every report diagnosed and "
                  f"stored in ClickHouse.[/] Files: {out_dir}/")
    env = f"SUPPORTLENS_CLICKHOUSE_DSN={settings.clickhouse_dsn} SUPPORTLENS_CLICKHOUSE_DATABASE={settings.clickhouse_database}"
    console.print(f"Look around yourself: [bold]{env} supportlens top --by region --since 2d[/]")


def _demo_settings(settings: Settings) -> Settings:
    """Own topics, own store, a free port for the support API: the demo never touches the real pipeline."""
    import socket

    with socket.socket() as sock:
        sock.bind((settings.support_host, 0))
        port = sock.getsockname()[1]
    update = {**DEMO_TIMING, "topic_prefix": f"{settings.topic_prefix}demo.", "support_port": port,
              "support_url": f"http://{settings.support_host}:{port}"}
    if settings.embedded_store:
        update["clickhouse_dsn"] = f"chdb://{settings.state_dir / 'demo-clickhouse'}"
    else:
        update["clickhouse_database"] = f"{settings.clickhouse_database}_demo"
    return settings.model_copy(update=update)


def _fresh_store(settings: Settings) -> None:
    """Start every demo from an empty store (the demo's own, see :func:`_demo_settings`)."""
    if settings.embedded_store:
        shutil.rmtree(settings.clickhouse_dsn.removeprefix("chdb://"), ignore_errors=True)
    else:
        store.connect(settings).command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")


def _sink_from_now_on(settings: Settings) -> None:
    """Point the demo's sink group at the end of its topics: the fresh store then holds this
    run, not whatever earlier demos left on the broker."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    from sinks.clickhouse_rows import MAPPINGS

    ends = end_offsets(settings, [settings.topic(name) for name in MAPPINGS])
    group = ConsumerGroupTopicPartitions(f"{settings.topic_prefix}sink",
                                         [TopicPartition(t, p, offset) for (t, p), offset in ends.items()])
    admin = AdminClient(settings.kafka_config())  # kept alive until the answer is in: a dropped client drops it
    for future in admin.alter_consumer_group_offsets([group], request_timeout=30).values():
        future.result(timeout=60)


def _start_serve(settings: Settings, log_path: Path, console: Console) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "supportlens", "serve"], env=settings.as_env() | _base_env(),
                             stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    with console.status("starting the pipeline (worker, ClickHouse sink, support API)…"):
        while not all(line in log_path.read_bytes() for line in (b"Worker ready", READY_LINE.encode())):
            if serve.poll() is not None or time.monotonic() > deadline:
                serve.kill()
                raise UserError(f"the pipeline did not start; see {log_path}")
            time.sleep(0.2)
    return serve


def _show_store(console: Console, settings: Settings, labels: list, runs: list[RunLabel], correlated: int,
                serve: subprocess.Popen[bytes]) -> list[str]:
    """Wait for the sink to store what the worker wrote, then show what support staff would see."""
    support = RemoteSupport(settings.support_url)
    last, since = -1, time.monotonic()
    with console.status("waiting for ClickHouse to hold every request…"):
        while True:
            rows = support.table_counts().rows["requests"]
            if rows != last:
                last, since = rows, time.monotonic()
            if rows >= correlated and time.monotonic() - since > 2:
                break
            if time.monotonic() - since > 60 or serve.poll() is not None:
                return [f"ClickHouse holds {rows} requests, the worker correlated {correlated}"]
            time.sleep(0.5)
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
        console.print(render.timeline_table(support.timeline("ip", customer.client_ip, since_us, until_us, 20)))
        console.print(f"\n[bold]supportlens lookup --request {customer.request_id}[/]: the request they reported")
        console.print(render.chain_view(support.request_chain(customer.request_id)))
    console.print("\n[bold]supportlens top --by service[/]: the problems of the whole run")
    console.print(render.top_table(support.top_problems("service", since_us, until_us, 10)))
    return []


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}


def _await_outputs(settings: Settings, before: Offsets, labels: list, worker: subprocess.Popen[bytes],
                   stall_s: float = 60.0) -> Score:
    """Read the worker's outputs for this run until every expected request and report is there
    and nothing new came for a moment (a later version of a request may still be on its way).

    Gives up only when the worker stops making progress for ``stall_s`` (a worker still
    catching up on an earlier backlog is progress) or exits.
    """
    quiet_s = DEMO_TIMING["correlation_settle_s"] + DEMO_TIMING["correlation_grace_s"] + 0.5
    outputs = {tp: offset for tp, offset in before.items() if tp[0] in {settings.topic(t) for t in OUTPUTS}}
    requests_topic = settings.topic("requests")
    progress, last_change = -1, time.monotonic()
    while True:
        requests, reports = [], []
        for message in read_range(settings, outputs):
            if message.topic() == requests_topic:
                requests.append(decode(message.value(), CorrelatedRequest))
            else:
                reports.append(decode(message.value(), DiagnosedReport))
        result = score(labels, requests, reports)
        if len(requests) + len(reports) != progress:
            progress, last_change = len(requests) + len(reports), time.monotonic()
        if result.requests_complete and result.reports_complete and time.monotonic() - last_change >= quiet_s:
            return result
        if time.monotonic() - last_change > stall_s or worker.poll() is not None:
            return result
        time.sleep(1.0)


def _print_scenario(console: Console, settings: Settings, run: RunLabel, seen: Observed, result: Score) -> list[str]:
    console.print(f"\n[bold cyan]{run.scenario}[/]: {SCENARIOS[run.scenario].description}")
    table = Table("topic", "sent (truth)", "read back", show_edge=False, box=None, padding=(0, 2))
    for row in compare(run, seen):
        table.add_row(row.topic, f"{row.expected:,}", f"{row.seen:,} {_mark(row.ok)}")
    console.print(fit(table, ids={"topic"}))
    problems = [f"{run.scenario}: {row.topic} sent {row.expected}, read {row.seen}" for row in compare(run, seen) if not row.ok]
    console.print(
        f"  correlated [bold]{len(result.correlated):,}[/] of {len(result.expected_requests):,} requests "
        f"{_mark(result.requests_complete)} · diagnosed {len(result.diagnosed):,} of {len(result.expected_reports):,} "
        f"reports {_mark(result.reports_complete)}"
    )
    if result.unexpected:
        console.print(f"  ({result.unexpected:,} requests of earlier runs were correlated meanwhile)")
    if not result.requests_complete:
        problems.append(f"{run.scenario}: {len(result.correlated)} of {len(result.expected_requests)} requests correlated")
    if not result.reports_complete:
        problems.append(f"{run.scenario}: {len(result.diagnosed)} of {len(result.expected_reports)} reports diagnosed")
    accuracy = accuracy_by_class(result.reports)
    if accuracy:
        parts = [f"{cls} {right}/{total} {_mark(right == total)}" for cls, (right, total) in accuracy.items()]
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


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"
