"""``supportlens demo``: every scripted scenario through real Kafka, then what landed, per scenario."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sinks.run_summary import RECORD_TYPES, Observed, compare, observe
from supportlens.config import Settings
from supportlens.errors import UserError
from supportlens.simulator.labels import RunLabel
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.topic_reader import end_offsets, read_range
from supportlens.topics import provision

DEMO_SCENARIOS = ("service-outage", "isp-outage", "bad-release", "misuse-wave", "quiet-night")


def run_demo(
    settings: Settings,
    console: Console,
    rate: float,
    duration_s: int,
    out_dir: Path,
    progress: Callable[[], Progress],
) -> None:
    """Simulate each scenario, read its records back from Kafka and print the summary.

    Raises :class:`UserError` if anything sent is missing or corrupt when read back.
    """
    provision(settings)
    topics = [settings.topic(name) for name in RECORD_TYPES]
    logical = {settings.topic(name): name for name in RECORD_TYPES}
    console.print(
        f"[bold]supportlens demo[/]: {len(DEMO_SCENARIOS)} scenarios, {rate:g} requests/s at peak, "
        f"{duration_s} simulated seconds each, Kafka at {settings.kafka_bootstrap}\n"
    )
    results: list[tuple[RunLabel, Observed]] = []
    for name in DEMO_SCENARIOS:
        before = end_offsets(settings, topics)
        options = SimulateOptions(name, rate, duration_s, speed=0, labels_path=out_dir / f"{name}.labels.jsonl")
        with progress() as bar:
            task = bar.add_task(f"{name:<15}", total=duration_s, sent=0)
            run = simulate(settings, options, lambda done, _t, sent: bar.update(task, completed=done, sent=sent))
        seen = observe(((logical[m.topic()], m.value()) for m in read_range(settings, before)), settings.max_record_bytes)
        results.append((run, seen))
        _print_scenario(console, settings, run, seen)

    console.print(_overview(results))
    broken = [run.scenario for run, seen in results if seen.invalid or not all(c.ok for c in compare(run, seen))]
    if broken:
        raise UserError(f"records went missing or arrived corrupt in: {', '.join(broken)}")
    console.print(f"[green]Every record of every scenario was read back from Kafka intact.[/] Labels: {out_dir}/")


def _print_scenario(console: Console, settings: Settings, run: RunLabel, seen: Observed) -> None:
    from supportlens.simulator.scenarios import SCENARIOS

    console.print(f"[bold cyan]{run.scenario}[/]: {SCENARIOS[run.scenario].description}")
    table = Table("topic", "sent (truth)", "read back", show_edge=False, box=None, padding=(0, 2))
    for row in compare(run, seen):
        mark = "[green]✓[/]" if row.ok else "[red]✗[/]"
        table.add_row(row.topic, f"{row.expected:,}", f"{row.seen:,} {mark}")
    console.print(table)
    truth = ", ".join(f"{cls} {n:,}" for cls, n in sorted(run.classes.items(), key=lambda kv: -kv[1]) if cls != "ok")
    console.print(f"  ground truth, failed requests by class: {truth or 'none'}")
    if seen.server_errors_by_service:
        svc, n = seen.server_errors_by_service.most_common(1)[0]
        console.print(f"  in the data: most failing service [bold]{svc}[/] ({n:,} server spans with 503)")
    if seen.client_errors_by_code:
        code, n = seen.client_errors_by_code.most_common(1)[0]
        console.print(f"  in the data: most frequent client error [bold]{code}[/] ({n:,})")
    reports = sum(seen.reports_by_region.values())
    if reports:
        region, n = seen.reports_by_region.most_common(1)[0]
        console.print(f"  in the data: {reports:,} fault reports from {len(seen.reporting_users):,} users, most from {region} ({n:,})")
    for incident in run.expected_incidents:
        dims = ", ".join(f"{k}={v}" for k, v in incident.dimension.items())
        console.print(f"  expected incident: {incident.expected_class} on {dims}, {(incident.end_us - incident.start_us) / 1e6:.0f} s")
    for reason, n in seen.invalid.most_common(3):
        console.print(f"  [red]invalid records[/]: {n} × {reason}")
    console.print()


def _overview(results: list[tuple[RunLabel, Observed]]) -> Table:
    table = Table("scenario", "requests", "spans", "reports", "reporters", "invalid",
                  title="per scenario: records sent, ✓ when all were read back")
    for run, seen in results:
        sent_spans = run.counts.get("client-spans", 0) + run.counts.get("server-spans", 0)
        read_spans = seen.records["client-spans"] + seen.records["server-spans"]
        table.add_row(
            run.scenario,
            f"{run.requests:,}",
            _sent_read(sent_spans, read_spans),
            _sent_read(run.counts.get("fault-reports", 0), seen.records["fault-reports"]),
            f"{len(seen.reporting_users):,}",
            f"{sum(seen.invalid.values()):,}",
        )
    return table


def _sent_read(sent: int, read: int) -> str:
    return f"{sent:,} [green]✓[/]" if sent == read else f"{sent:,} → {read:,} [red]✗[/]"
