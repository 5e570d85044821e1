"""Surge detection and incident declaration on simulated outages, quiet nights and a whole day.

The offline replay (:func:`streams.offline.replay`) runs the worker's own pure functions —
counting (``streams.signals``), the surge engine (``streams.detect``) and the declaration
policy (``streams.incidents`` + ``incident_policy.toml``) — over simulator runs, without Kafka.

- Outages (service-outage, isp-outage, bad-release), one run per seed: how long after the
  fault started the incident was declared, whether it names the scenario's dimension,
  how long after the fault ended it was resolved. The detector keeps its production
  parameters, whose warm-up needs 15 minutes of history: each run simulates 15 minutes of
  ordinary traffic, then the 15-minute scenario (its fault window at the scenario's own
  fractions of those 15 minutes).
- Ordinary traffic: quiet nights (one run per seed) and a 24-hour day, time-compressed
  (a low rate): surges seen and incidents declared, where the goal is none.

Usage: python bench/incidents.py [--seeds 10] [--rate 100] [--day-rate 5] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from supportlens.simulator.generate import Plan, Simulation
from supportlens.simulator.scenarios import Scenario, scenario
from supportlens.simulator.world import build_world
from streams.catalog import load_catalog
from streams.detect import EngineConfig
from streams.incidents import load_policy
from streams.offline import replay
from streams.surge import SurgeParams

US = 1_000_000
USERS = 5000
OUTAGES = ("service-outage", "isp-outage", "bad-release")
SCENARIO_S = 900
PARAMS = SurgeParams()
HISTORY_S = PARAMS.warmup_buckets * PARAMS.bucket_s  # what the production warm-up needs
OUTAGE_START_HOUR = 4  # 04:00 UTC, as in tests/test_offline_scenarios.py: midday in Asia, night in Europe
DAY_S = 86_400
DECLARE_GOAL_S = 30
POLICY = load_policy()
RESOLVE_GOAL_S = POLICY.resolve.cooldown_s + 30


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    seed: int
    rate: float
    duration_s: int
    start_hour_utc: int
    history_s: int = 0  # ordinary traffic before the scenario's own duration


@dataclasses.dataclass(frozen=True)
class Result:
    job: Job
    surges: int
    incidents: int
    declared_after_s: float | None  # the first declaration, after the fault started
    named_at_declaration: bool  # the scenario's dimensions are among the incident's when it is declared
    named_by_end: bool  # … in its last event (surges that start a bucket later join it)
    resolved_after_s: float | None  # its resolution, after the fault ended
    elapsed_s: float


def after_history(chosen: Scenario, history_s: int, total_s: int) -> Scenario:
    """The scenario with its fault window placed, at its own fractions, in the ``total_s −
    history_s`` seconds that follow ``history_s`` of ordinary traffic."""
    lo, hi = chosen.window
    own_s = total_s - history_s
    return dataclasses.replace(chosen, window=((history_s + lo * own_s) / total_s, (history_s + hi * own_s) / total_s))


def run(job: Job) -> Result:
    started = time.perf_counter()
    chosen = scenario(job.name)
    if job.history_s:
        chosen = after_history(chosen, job.history_s, job.duration_s)
    start_us = int(datetime(2026, 11, 22, job.start_hour_utc, tzinfo=timezone.utc).timestamp()) * US
    plan = Plan(chosen, job.rate, job.duration_s, job.seed, start_us)
    simulation = Simulation(plan, build_world(job.seed, USERS))
    records = ((emit.ts_us, emit.record) for tick in simulation.ticks() for emit in tick.events)
    out = replay(records, load_catalog(), POLICY, EngineConfig(PARAMS))

    fault_start, fault_end = plan.window_us
    declared = [e for e in out.incidents if e.transition == "declared"]
    first = declared[0] if declared else None
    mine = [e for e in out.incidents if first and e.incident_id == first.incident_id]
    resolved = [e for e in mine if e.transition == "resolved"]
    expected = chosen.dimension.items()
    return Result(
        job=job,
        surges=sum(e.phase == "start" for e in out.surges),
        incidents=len(declared),
        declared_after_s=(first.at_us - fault_start) / US if first else None,
        named_at_declaration=bool(first) and expected <= first.dimensions.items(),
        named_by_end=bool(mine) and expected <= mine[-1].dimensions.items(),
        resolved_after_s=(resolved[0].at_us - fault_end) / US if resolved else None,
        elapsed_s=time.perf_counter() - started,
    )


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: with 10 values, p95 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: list[float | None]) -> str:
    """p50 / p95 / max of the runs that got there, and how many never did."""
    known = [v for v in values if v is not None]
    if not known:
        return "never"
    text = f"{percentile(known, 50):.0f} / {percentile(known, 95):.0f} / {max(known):.0f} s"
    return text + (f" ({len(values) - len(known)} never)" if len(known) < len(values) else "")


def against(values: list[float | None], p: float, goal_s: float) -> tuple[str, str]:
    """The p-th percentile as a figure, and whether it meets ``goal_s`` (a run that never got there fails it)."""
    known = [v for v in values if v is not None]
    never = len(values) - len(known)
    if not known:
        return "never", verdict(False)
    value = percentile(known, p)
    return f"{value:.0f} s" + (f", {never} never" if never else ""), verdict(not never and value <= goal_s)


def missed(result: Result) -> str:
    """What one outage run missed, in a few words; empty when it met every goal."""
    misses = []
    if result.declared_after_s is None or result.declared_after_s > DECLARE_GOAL_S:
        misses.append("never declared" if result.declared_after_s is None
                      else f"declared after {result.declared_after_s:.0f} s")
    if not result.named_by_end:
        misses.append("not the scenario's dimension")
    if result.resolved_after_s is None or result.resolved_after_s > RESOLVE_GOAL_S:
        misses.append("never resolved" if result.resolved_after_s is None
                      else f"resolved {result.resolved_after_s:.0f} s after the fault end")
    return f"{result.job.name} seed {result.job.seed}: {', '.join(misses)}" if misses else ""


def verdict(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]not met[/red]"


def table(title: str, *columns: str) -> Table:
    made = Table(title=title)
    for i, column in enumerate(columns):
        made.add_column(column, justify="left" if i == 0 else "right")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200, help="requests per second at the daily peak (outages, nights); "
                        "at 100 a bad release's ~1 crash/s takes up to 40 s to declare")
    parser.add_argument("--day-rate", type=float, default=5, help="requests per second at the peak of the 24-h day")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (processes)")
    args = parser.parse_args()

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file: no wrapping of the tables
    console.print("[bold]Incident detection, offline[/bold]: the offline replay runs the worker's own pure "
                  "functions (streams.signals → streams.detect → streams.incidents), without Kafka.")
    console.print(f"Detector: production parameters (warm-up {PARAMS.warmup_buckets} buckets of {PARAMS.bucket_s} s). "
                  f"Each outage run: {HISTORY_S // 60} min of ordinary traffic, then the {SCENARIO_S // 60}-min "
                  f"scenario; {args.rate:g} req/s at the daily peak, {USERS} users, from "
                  f"{OUTAGE_START_HOUR:02d}:00 UTC; seeds 1–{args.seeds}.")

    seeds = range(1, args.seeds + 1)
    jobs = [Job(name, seed, args.rate, HISTORY_S + SCENARIO_S, OUTAGE_START_HOUR, HISTORY_S)
            for name in OUTAGES for seed in seeds]
    night = scenario("quiet-night").start_hour_utc or 0
    jobs += [Job("quiet-night", seed, args.rate, HISTORY_S + SCENARIO_S, night) for seed in seeds]
    day = Job("normal", 1, args.day_rate, DAY_S, 0)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool, Progress(console=console, transient=True) as progress:
        futures = [pool.submit(run, job) for job in [day, *jobs]]  # the longest run first
        task = progress.add_task("simulating and replaying", total=len(futures))
        for _ in as_completed(futures):
            progress.advance(task)
        day_result, *results = [future.result() for future in futures]
    wall_s = time.perf_counter() - started

    outages = table("Outages: declared after the fault started, resolved after it ended (p50 / p95 / max)",
                    "scenario", "declared", "one incident", "right dimension: at declaration / by the end",
                    "declared after", "resolved after", "surges per run")
    goals = table("Goals", "goal", "figure", "")
    for name in OUTAGES:
        mine = [r for r in results if r.job.name == name]
        n = len(mine)
        declared = [r.declared_after_s for r in mine]
        resolved = [r.resolved_after_s for r in mine]
        named = sum(r.named_by_end for r in mine)
        named_at_once = sum(r.named_at_declaration for r in mine)
        outages.add_row(name, f"{sum(d is not None for d in declared)}/{n}", f"{sum(r.incidents == 1 for r in mine)}/{n}",
                        f"{named_at_once}/{n} / {named}/{n}", spread(declared), spread(resolved),
                        f"{sum(r.surges for r in mine) / n:.1f}")
        goals.add_row(f"{name}: declared within {DECLARE_GOAL_S} s of the fault start (p95)",
                      *against(declared, 95, DECLARE_GOAL_S))
        goals.add_row(f"{name}: the scenario's dimension named (every run, by the incident's end)", f"{named}/{n}",
                      verdict(named == n))
        goals.add_row(f"{name}: resolved within cool-down + 30 = {RESOLVE_GOAL_S} s of the fault end (max)",
                      *against(resolved, 100, RESOLVE_GOAL_S))

    ordinary = table("Ordinary traffic: surges seen and incidents declared", "run", "runs", "surges", "incidents",
                     "runtime")
    nights = [r for r in results if r.job.name == "quiet-night"]
    night_incidents = sum(r.incidents for r in nights)
    ordinary.add_row(f"quiet night: {(HISTORY_S + SCENARIO_S) // 60} min from {night:02d}:00 UTC, {args.rate:g} req/s",
                     str(len(nights)), str(sum(r.surges for r in nights)), str(night_incidents),
                     f"{sum(r.elapsed_s for r in nights) / len(nights):.0f} s each")
    ordinary.add_row(f"normal day: 24 h from 00:00 UTC, {args.day_rate:g} req/s at the peak", "1",
                     str(day_result.surges), str(day_result.incidents), f"{day_result.elapsed_s:.0f} s")
    goals.add_row("0 incidents on a normal day (24 h)", str(day_result.incidents), verdict(day_result.incidents == 0))
    goals.add_row(f"0 incidents on quiet nights ({len(nights)} runs)", str(night_incidents), verdict(night_incidents == 0))

    console.print(outages)
    console.print(ordinary)
    console.print(goals)
    misses = [miss for r in results if r.job.name in OUTAGES and (miss := missed(r))]
    if misses:
        console.print("Runs that missed a goal: " + "; ".join(misses) + ".")
    console.print(f"{len(jobs) + 1} runs in {wall_s:.0f} s with {args.jobs} processes. Percentiles are nearest-rank: "
                  f"with {args.seeds} seeds, p95 is the slowest run.")


if __name__ == "__main__":
    main()
