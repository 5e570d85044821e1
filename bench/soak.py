"""Soak: the whole pipeline at a fixed rate for half an hour — memory over time, consumer lag, end-to-end latency.

What runs, all on the local broker in a namespace of the soak's own (topics
``<prefix>soak-<timestamp>.*``, its own consumer groups, a temporary state directory with
its own embedded ClickHouse, free ports), so it never touches a real pipeline:

- the pipeline: ``supportlens serve`` as a child process (ClickHouse sink and support API
  in it, the stream worker as its child), with the production timings (correlation
  settle, grace, retention) of the resolved settings;
- traffic: the simulator's ``normal`` scenario at ``--rate`` requests per wall second,
  steady. The simulator scales each region by its time of day, so the soak runs it one
  minute at a time, each minute with the peak rate that gives ``--rate`` at that moment
  and a seed of its own (fresh request ids), over one fixed set of users and accounts;
- probes: every few seconds one request of our own (a client and a server span with a
  fresh request id, stamped now, produced like the simulator's), timed until the support
  API's ``/v1/request`` lookup shows its spans (sink path) and its correlated request
  (worker, then sink: the end-to-end latency a support agent sees).

Every ``--every`` seconds it samples the RSS and CPU of each pipeline process (serve and
its worker child), the lag of each consumer group (high watermarks − committed offsets,
over the partitions the group has committed) and the probes of that interval; one row
per sample is printed and appended to ``out/soak/<timestamp>/samples.{csv,jsonl}``
(probes to ``probes.csv``, the pipeline's log to ``serve.log``).

Warm-up: Python heaps, librdkafka buffers and chDB's caches fill first, and the worker
keeps every emitted request for ``correlation_retain_s`` (300 s by default) to version
late spans, so at a fixed rate its memory only levels off after that long. The sink's
embedded ClickHouse takes longer: in earlier 30-minute runs serve's RSS rose for 9–13
minutes (native memory of the engine while its parts and allocator settle; the Python
heap stays flat) and then moved within ±5 %. The default warm-up is therefore 15 minutes
(at least ``correlation_retain_s``), and ``--minutes`` (30) of the same traffic follow it:
memory is judged over those, the median RSS of the last three samples against the median
of the first three after warm-up (one sample can catch a merge or a batch in flight), per
process. The rows of the warm-up are printed and saved too.

Verdict (exit status 1 when any is not met, with the reason): every process's RSS grew at
most 10 %; the pipeline stayed up; every probe became visible within 60 s; at the end
the pipeline was less than 30 s of traffic behind. Ctrl-C (or SIGTERM) stops early and
still reports what was measured (exit 130 unless something already failed: part of a run
is no pass). The soak always stops its processes, deletes its topics and consumer groups
and removes its state directory. Each row also shows the machine's load average: the
latency and lag figures only mean something on a machine the soak has to itself.

Usage: python bench/soak.py [--minutes 30] [--rate 150] [--every 30] [--warmup-minutes 15]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `sinks` is a top-level package of the repo

from supportlens.bulk_producer import BulkProducer  # noqa: E402
from supportlens.config import Settings, load_settings  # noqa: E402
from supportlens.contracts import Span  # noqa: E402
from supportlens.errors import UserError  # noqa: E402
from supportlens.serve import READY_LINE  # noqa: E402
from supportlens.simulator.generate import Plan, Simulation, seasonal_factor  # noqa: E402
from supportlens.simulator.run import send_records, tick_records  # noqa: E402
from supportlens.span_batches import pack_spans  # noqa: E402
from supportlens.simulator.scenarios import scenario  # noqa: E402
from supportlens.simulator.world import World, build_world  # noqa: E402
from supportlens.support.access import RemoteSupport  # noqa: E402
from supportlens.topics import provision  # noqa: E402

GROWTH_LIMIT = 0.10  # the issue: memory stays flat within 10 %
JUDGE_WINDOW = 3  # samples whose median stands for "after warm-up" and for "the end"
CHUNK_S = 60  # simulated seconds per simulator run; each gets its own peak rate and seed
SEED = 7
USERS = 5000
PROBE_EVERY_S = 5.0
PROBE_POLL_S = 0.2
PROBE_TIMEOUT_S = 60.0
BEHIND_LIMIT_S = 30.0  # lag at the end, in seconds of traffic: beyond the correlation grace is not keeping up
START_TIMEOUT_S = 120.0
WARMUP_S = 900.0  # serve's embedded engine levelled off after 9–13 min in earlier runs; see the docstring
MB = 1024 * 1024


# -- the pipeline ------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def soak_settings(base: Settings, stamp: str, state_dir: Path) -> Settings:
    """Own topics, groups, store and ports; the rest (timings, broker, security) as resolved."""
    support_port = free_port(base.support_host)
    return base.model_copy(update={
        "topic_prefix": f"{base.topic_prefix}soak-{stamp}.",
        "state_dir": state_dir,
        "clickhouse_dsn": f"chdb://{state_dir / 'clickhouse'}",  # the issue: serve on embedded chDB
        "support_port": support_port,
        "support_url": f"http://{base.support_host}:{support_port}",
        "worker_metrics_port": free_port(base.metrics_host),
        "sink_metrics_port": 0,  # serve's API serves the sink's metrics
    })


def start_serve(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """``supportlens serve`` in a session of its own: a Ctrl-C meant for the soak must not
    reach it (the soak stops it itself, after its last sample)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")} | settings.as_env()
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "supportlens", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(serve: subprocess.Popen[bytes], log_path: Path, console: Console) -> None:
    """Return once the worker and the API are up; :class:`UserError` if serve exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with console.status("starting the pipeline (worker, ClickHouse sink, support API)…"):
        while not all(line in log_path.read_bytes() for line in (b"Worker ready", READY_LINE.encode())):
            if serve.poll() is not None:
                raise UserError(f"the pipeline exited with code {serve.returncode} while starting",
                                hint=f"see {log_path}")
            if time.monotonic() > deadline:
                raise UserError(f"the pipeline was not ready after {START_TIMEOUT_S:.0f} s", hint=f"see {log_path}")
            time.sleep(0.2)


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    rss_mb: float
    cpu_pct: float


class Processes:
    """RSS and CPU of serve and every process under it, by role (``serve``, ``worker``)."""

    def __init__(self, serve_pid: int) -> None:
        self.serve = psutil.Process(serve_pid)
        self.seen: dict[int, psutil.Process] = {serve_pid: self.serve}  # kept: cpu_percent measures between calls
        self.serve.cpu_percent(None)

    def role(self, proc: psutil.Process) -> str:
        if proc.pid == self.serve.pid:
            return "serve"
        try:
            args = proc.cmdline()
        except psutil.Error:
            return f"pid {proc.pid}"
        return "worker" if "worker" in args else f"pid {proc.pid}"

    def sample(self) -> dict[str, ProcessSample]:
        try:
            procs = [self.serve, *self.serve.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        out: dict[str, ProcessSample] = {}
        for proc in procs:
            proc = self.seen.setdefault(proc.pid, proc)
            try:
                with proc.oneshot():
                    out[self.role(proc)] = ProcessSample(proc.pid, proc.memory_info().rss / MB, proc.cpu_percent(None))
            except psutil.NoSuchProcess:
                continue
        return out

    def worker_alive(self) -> bool:
        """Is a worker under serve? (Without touching the CPU counters the samples read.)"""
        try:
            return any(self.role(proc) == "worker" for proc in self.serve.children(recursive=True))
        except psutil.NoSuchProcess:
            return False

    def still_running(self) -> list[psutil.Process]:
        """Processes of the pipeline seen at any sample and still alive (the same process:
        psutil checks its start time, so a reused pid is never taken for it)."""
        return [proc for proc in self.seen.values() if proc.is_running()]


def stop_pipeline(serve: subprocess.Popen[bytes], processes: Processes | None) -> None:
    """SIGTERM to serve (it stops its worker and flushes its sink), then SIGKILL whatever of
    the pipeline is left after 60 s."""
    if serve.poll() is None:
        serve.terminate()
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(10)
    for proc in processes.still_running() if processes else []:
        try:
            proc.kill()
        except psutil.Error:
            pass


def delete_namespace(settings: Settings) -> list[str]:
    """Delete the soak's topics (the worker's changelogs included: they share the prefix) and
    consumer groups; returns what could not be deleted."""
    admin = AdminClient(settings.kafka_config())
    problems = []
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix)]
    for name, future in (admin.delete_topics(names, operation_timeout=30).items() if names else []):
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - reported, the rest still goes
            problems.append(f"topic {name}: {exc}")
    groups = [f"{settings.topic_prefix}worker", f"{settings.topic_prefix}sink"]
    for group, future in admin.delete_consumer_groups(groups, request_timeout=30).items():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - a group that never committed does not exist
            if "GROUP_ID_NOT_FOUND" not in str(exc):
                problems.append(f"group {group}: {exc}")
    return problems


# -- traffic and probes ----------------------------------------------------------------------


def day_factor(world: World, at_us: int) -> float:
    """Requests per second the simulator sends at ``at_us`` per request/s of peak rate
    (each region's share of users × its time-of-day factor)."""
    utc_hour = (at_us / 3_600_000_000) % 24
    regions = Counter(user.region.utc_offset_h for user in world.users)
    return sum(n / len(world.users) * seasonal_factor(utc_hour, offset) for offset, n in regions.items())


class Traffic(threading.Thread):
    """The ``normal`` scenario at ``rate`` requests per wall second until ``stop`` is set."""

    def __init__(self, settings: Settings, world: World, rate: float, stop: threading.Event) -> None:
        super().__init__(name="traffic", daemon=True)
        self.settings, self.world, self.rate, self.stop = settings, world, rate, stop
        self.requests = 0
        self.records = 0
        self.error = ""

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - the main thread reports it and fails the soak
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        producer = BulkProducer(self.settings)
        partitions = self.settings.partitions
        normal = scenario("normal")
        due = time.monotonic()
        chunk = 0
        while not self.stop.is_set():
            start_us = time.time_ns() // 1000
            plan = Plan(normal, self.rate / day_factor(self.world, start_us), CHUNK_S, SEED + chunk, start_us)
            simulation = Simulation(plan, self.world)
            if chunk == 0:  # the accounts once: the same customers all along
                send_records(producer, self.settings, tick_records(simulation.accounts(), partitions, batch=False))
            before = self.requests
            for tick in simulation.ticks():
                # as `simulate` sends them: spans in batch records per partition
                records = tick_records(tick.events, partitions, max_record_bytes=self.settings.max_record_bytes)
                send_records(producer, self.settings, records)
                self.records += len(records)  # Kafka records, the unit of the lag they are divided into
                self.requests = before + simulation.requests
                producer.poll()
                if producer.failed:
                    raise UserError(f"Kafka refused records: {producer.failures[0]}")
                if tick.second < CHUNK_S:  # the tail (late fault reports) takes no second of its own
                    due += 1.0
                    if self.stop.wait(max(0.0, due - time.monotonic())):
                        break
            chunk += 1
        producer.wait(5.0)


@dataclass(frozen=True)
class Probe:
    sent_s: float  # seconds since the traffic started
    request_id: str
    stored_s: float | None  # until both spans were in ClickHouse (the sink's path)
    correlated_s: float | None  # until the correlated request was (worker, then sink): end to end
    error: str = ""


class Prober(threading.Thread):
    """One probe request every ``PROBE_EVERY_S``, timed until the support API shows it."""

    def __init__(self, settings: Settings, world: World, started: float, stop: threading.Event) -> None:
        super().__init__(name="probes", daemon=True)
        self.settings, self.started, self.stop = settings, started, stop
        self.user = next(user for user in world.users if user.consented)
        self.support = RemoteSupport(settings.support_url, timeout=10.0)
        self.producer = Producer(settings.producer_config(**{"linger.ms": 0, "enable.idempotence": True}))
        self.probes: list[Probe] = []
        self.lock = threading.Lock()

    def taken(self, since_s: float = 0.0) -> list[Probe]:
        with self.lock:
            return [p for p in self.probes if p.sent_s >= since_s]

    def run(self) -> None:
        slot = time.monotonic()
        while not self.stop.wait(max(0.0, slot - time.monotonic())):
            slot += PROBE_EVERY_S
            probe = self.one()
            if probe is not None:
                with self.lock:
                    self.probes.append(probe)

    def spans(self, request_id: str, now_us: int) -> tuple[Span, Span]:
        user, trace_id = self.user, uuid.uuid4().hex
        client_span_id, server_span_id = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
        who = dict(user_id=user.user_id, account_id=user.account_id, app_version=user.app_version,
                   platform=user.platform, region=user.region.name)
        client = Span(request_id=request_id, trace_id=trace_id, span_id=client_span_id, side="client",
                      service="mobile-app", operation="GET /v1/catalog", start_us=now_us, duration_us=120_000,
                      status="ok", http_status=200, client_ip=user.client_ip, network=user.network,
                      attributes={"screen": "home", "soak.probe": True}, **who)
        server = Span(request_id=request_id, trace_id=trace_id, span_id=server_span_id,
                      parent_span_id=client_span_id, side="server", service="edge-gateway",
                      operation="GET /v1/catalog", start_us=now_us + 20_000, duration_us=80_000, status="ok",
                      http_status=200, attributes={"team": "sre", "soak.probe": True}, **who)
        return client, server

    def one(self) -> Probe | None:
        """A probe, or None when the soak stopped before it was seen (neither fast nor lost)."""
        request_id = str(uuid.uuid4())
        now_us = time.time_ns() // 1000
        client, server = self.spans(request_id, now_us)
        t0 = time.monotonic()
        sent_s = t0 - self.started
        # batch records like the traffic's (one span each here: one request, one span a side)
        for topic, batch in pack_spans((("client-spans", client), ("server-spans", server)),
                                       self.settings.partitions, self.settings.max_record_bytes):
            self.producer.produce(self.settings.topic(topic), key=batch.key, value=batch.value,
                                  partition=batch.partition, timestamp=now_us // 1000)
        if self.producer.flush(10):
            return Probe(sent_s, request_id, None, None, "Kafka did not take the probe within 10 s")
        stored = None
        error = ""
        while time.monotonic() - t0 < PROBE_TIMEOUT_S:
            try:
                chain = self.support.request_chain(request_id)
            except UserError as exc:
                error = exc.message
            else:
                elapsed = time.monotonic() - t0
                if stored is None and len(chain.spans) >= 2:
                    stored = elapsed
                if chain.version > 0:
                    return Probe(sent_s, request_id, stored, elapsed)
            if self.stop.wait(PROBE_POLL_S):
                return None
        return Probe(sent_s, request_id, stored, None, error or f"not visible within {PROBE_TIMEOUT_S:.0f} s")


# -- consumer lag ------------------------------------------------------------------------------


class Lag:
    """Records on the broker not yet committed, per consumer group and logical topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = AdminClient(settings.kafka_config())
        self.groups = {"worker": f"{settings.topic_prefix}worker", "sink": f"{settings.topic_prefix}sink"}

    def logical(self, topic: str) -> str:
        return topic.removeprefix(self.settings.topic_prefix)

    def of(self, group: str) -> dict[str, int] | None:
        """Σ (high watermark − committed offset) by topic over the partitions the group has
        committed; None before its first commit or when the broker does not answer."""
        try:
            request = [ConsumerGroupTopicPartitions(group)]
            result = self.admin.list_consumer_group_offsets(request, request_timeout=10)[group].result()
            committed = [tp for tp in result.topic_partitions if tp.offset >= 0 and tp.error is None]
            if not committed:
                return None
            ends = self.admin.list_offsets({TopicPartition(tp.topic, tp.partition): OffsetSpec.latest()
                                            for tp in committed}, request_timeout=10)
            high = {(tp.topic, tp.partition): future.result().offset for tp, future in ends.items()}
        except Exception:  # noqa: BLE001 - a missed reading shows as "?", the next sample tries again
            return None
        by_topic: Counter[str] = Counter()
        for tp in committed:
            by_topic[self.logical(tp.topic)] += max(0, high[(tp.topic, tp.partition)] - tp.offset)
        return dict(by_topic)

    def sample(self) -> dict[str, dict[str, int] | None]:
        return {name: self.of(group) for name, group in self.groups.items()}


# -- samples and the verdict ---------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float
    at: str
    phase: str  # warm-up | steady
    processes: dict[str, ProcessSample]
    lag: dict[str, dict[str, int] | None]
    requests_per_s: float
    records_per_s: float
    load: float  # the machine's 1-minute load average: other work on the same cores shows here
    probes: list[Probe] = field(default_factory=list)

    def lag_total(self, group: str) -> int | None:
        by_topic = self.lag.get(group)
        return None if by_topic is None else sum(by_topic.values())

    def latencies(self) -> list[float]:
        return [p.correlated_s for p in self.probes if p.correlated_s is not None]

    def row(self) -> dict[str, Any]:
        """One flat row for the CSV."""
        out: dict[str, Any] = {"t_s": round(self.t_s, 1), "at": self.at, "phase": self.phase}
        for role in ("serve", "worker"):
            proc = self.processes.get(role)
            out[f"rss_{role}_mb"] = round(proc.rss_mb, 1) if proc else ""
            out[f"cpu_{role}_pct"] = round(proc.cpu_pct, 1) if proc else ""
        out["rss_total_mb"] = round(sum(p.rss_mb for p in self.processes.values()), 1)
        for group in ("worker", "sink"):
            total = self.lag_total(group)
            out[f"lag_{group}"] = "" if total is None else total
        out["requests_per_s"] = round(self.requests_per_s, 1)
        out["records_per_s"] = round(self.records_per_s, 1)
        out["load"] = round(self.load, 2)
        latencies = sorted(self.latencies())
        stored = sorted(p.stored_s for p in self.probes if p.stored_s is not None)
        out["probes"] = len(self.probes)
        out["probes_lost"] = sum(p.correlated_s is None for p in self.probes)
        out["e2e_p50_ms"] = round(percentile(latencies, 50) * 1000) if latencies else ""
        out["e2e_max_ms"] = round(latencies[-1] * 1000) if latencies else ""
        out["stored_p50_ms"] = round(percentile(stored, 50) * 1000) if stored else ""
        return out

    def record(self) -> dict[str, Any]:
        """Everything, for the JSONL file (lag by topic, each probe)."""
        return {"t_s": round(self.t_s, 1), "at": self.at, "phase": self.phase,
                "processes": {role: asdict(p) for role, p in self.processes.items()}, "lag": self.lag,
                "requests_per_s": round(self.requests_per_s, 1), "records_per_s": round(self.records_per_s, 1),
                "load": round(self.load, 2), "probes": [asdict(p) for p in self.probes]}


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank over sorted values."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Memory:
    role: str
    after_warmup_mb: float
    end_mb: float
    peak_mb: float
    slope_mb_per_10min: float

    @property
    def growth(self) -> float:
        return self.end_mb / self.after_warmup_mb - 1

    @property
    def flat(self) -> bool:
        return self.growth <= GROWTH_LIMIT


def memory_verdicts(samples: list[Sample], warmup_s: float) -> list[Memory]:
    """Per process: median RSS of the first ``JUDGE_WINDOW`` samples after warm-up against the
    median of the last ``JUDGE_WINDOW`` (fewer when the run is short; empty with under two)."""
    steady = [s for s in samples if s.t_s >= warmup_s]
    if len(steady) < 2:
        return []
    window = max(1, min(JUDGE_WINDOW, len(steady) // 2))
    out = []
    for role in sorted(steady[0].processes, key=lambda r: (r != "serve", r)):
        series = [(s.t_s, s.processes[role].rss_mb) for s in steady if role in s.processes]
        if len(series) < 2:
            continue
        values = [mb for _, mb in series]
        out.append(Memory(role, statistics.median(values[:window]), statistics.median(values[-window:]),
                          max(values), slope(series) * 600))
    return out


def slope(series: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second)."""
    xs, ys = [x for x, _ in series], [y for _, y in series]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in series) / var if var else 0.0


# -- output --------------------------------------------------------------------------------------

COLUMNS = (  # (header, width)
    ("t", 6), ("phase", 7), ("RSS serve MB", 12), ("RSS worker MB", 13), ("CPU serve %", 11),
    ("CPU worker %", 12), ("lag worker", 10), ("lag sink", 8), ("req/s", 6), ("e2e p50 ms", 10),
    ("e2e max ms", 10), ("probes", 6), ("load", 5),
)


def sample_table(sample: Sample, header: bool) -> Table:
    """One row, with the same fixed column widths every time: the rows line up as one table."""
    table = Table(show_header=header, box=None, pad_edge=False, header_style="bold")
    for i, (name, width) in enumerate(COLUMNS):
        table.add_column(name, width=width, no_wrap=True, justify="left" if i < 2 else "right")
    row = sample.row()
    lost = row["probes_lost"]
    table.add_row(
        f"{int(sample.t_s) // 60}:{int(sample.t_s) % 60:02d}", sample.phase,
        f"{row['rss_serve_mb']}", f"{row['rss_worker_mb']}", f"{row['cpu_serve_pct']}", f"{row['cpu_worker_pct']}",
        _or_q(row["lag_worker"]), _or_q(row["lag_sink"]), f"{sample.requests_per_s:.0f}",
        f"{row['e2e_p50_ms']}", f"{row['e2e_max_ms']}",
        f"{row['probes']}" + (f" [red]{lost} lost[/]" if lost else ""), f"{sample.load:.1f}",
    )
    return table


def _or_q(value: Any) -> str:
    return "?" if value == "" else f"{value:,}"


class Files:
    """samples.csv (flat, one row per sample), samples.jsonl (everything) and probes.csv,
    written as the soak goes: a killed soak leaves its data behind."""

    def __init__(self, out_dir: Path) -> None:
        self.csv_path, self.jsonl_path, self.probes_path = (out_dir / "samples.csv", out_dir / "samples.jsonl",
                                                            out_dir / "probes.csv")
        self.writer: csv.DictWriter | None = None
        self.handles = [self.csv_path.open("w", newline=""), self.jsonl_path.open("w"),
                        self.probes_path.open("w", newline="")]
        self.probes = csv.writer(self.handles[2])
        self.probes.writerow(("sent_s", "request_id", "stored_ms", "correlated_ms", "error"))

    def add(self, sample: Sample) -> None:
        row = sample.row()
        if self.writer is None:
            self.writer = csv.DictWriter(self.handles[0], fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.handles[1].write(json.dumps(sample.record()) + "\n")
        for p in sample.probes:
            self.probes.writerow((round(p.sent_s, 2), p.request_id, _ms(p.stored_s), _ms(p.correlated_s), p.error))
        for handle in self.handles:
            handle.flush()

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(round(seconds * 1000))


def verdict(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]not met[/red]"


def report(console: Console, samples: list[Sample], probes: list[Probe], args: argparse.Namespace,
           warmup_s: float, died: str, traffic_error: str, interrupted: bool) -> tuple[list[str], bool]:
    """Print the verdict; returns (what failed, whether memory could be judged at all)."""
    failures: list[str] = []
    memory = memory_verdicts(samples, warmup_s)
    ran_s = samples[-1].t_s if samples else 0.0

    table = Table(title=f"Memory (RSS): after warm-up ({warmup_s / 60:g} min) against the end of the run "
                        f"(medians of {JUDGE_WINDOW} samples)")
    for i, column in enumerate(("process", "after warm-up MB", "end MB", "growth", "peak MB", "trend MB/10 min",
                                f"flat (≤ {GROWTH_LIMIT:.0%})")):
        table.add_column(column, justify="left" if i == 0 else "right")
    for m in memory:
        table.add_row(m.role, f"{m.after_warmup_mb:,.1f}", f"{m.end_mb:,.1f}", f"{m.growth:+.1%}",
                      f"{m.peak_mb:,.1f}", f"{m.slope_mb_per_10min:+.1f}", verdict(m.flat))
        if not m.flat:
            failures.append(f"{m.role} RSS grew {m.growth:+.1%} after warm-up "
                            f"({m.after_warmup_mb:,.0f} → {m.end_mb:,.0f} MB; limit {GROWTH_LIMIT:.0%})")
    if memory:
        total_after, total_end = sum(m.after_warmup_mb for m in memory), sum(m.end_mb for m in memory)
        table.add_row("[dim]all[/dim]", f"{total_after:,.1f}", f"{total_end:,.1f}", f"{total_end / total_after - 1:+.1%}",
                      "", f"{sum(m.slope_mb_per_10min for m in memory):+.1f}", "")
        console.print(table)
    else:
        console.print(f"[yellow]Memory not judged[/]: {ran_s / 60:.1f} min ran, fewer than two samples after the "
                      f"{warmup_s / 60:g}-minute warm-up.")

    lag = Table(title="Consumer lag (records on the broker not yet committed)")
    for i, column in enumerate(("group", "max", "max after warm-up", "at the end", "at the end, in s of traffic")):
        lag.add_column(column, justify="left" if i == 0 else "right")
    last = samples[-1] if samples else None
    records_per_s = statistics.fmean(s.records_per_s for s in samples[1:]) if len(samples) > 1 else 0.0
    for group in ("worker", "sink"):
        values = [v for s in samples if (v := s.lag_total(group)) is not None]
        steady = [v for s in samples if s.t_s >= warmup_s and (v := s.lag_total(group)) is not None]
        end = last.lag_total(group) if last else None
        behind_s = end / records_per_s if end is not None and records_per_s else None
        lag.add_row(group, f"{max(values):,}" if values else "?", f"{max(steady):,}" if steady else "–",
                    f"{end:,}" if end is not None else "?", f"{behind_s:.1f} s" if behind_s is not None else "?")
        if behind_s is not None and behind_s > BEHIND_LIMIT_S:
            failures.append(f"the {group} fell behind: {end:,} records on the broker at the end "
                            f"(≈ {behind_s:.0f} s of traffic; limit {BEHIND_LIMIT_S:.0f} s)")
    console.print(lag)

    latency = Table(title="End-to-end latency: probe produced → visible through the support API "
                          "(correlated request; spans alone in brackets)")
    for i, column in enumerate(("probes", "n", "p50", "p95", "max", "lost")):
        latency.add_column(column, justify="left" if i == 0 else "right")
    for title, chosen in (("whole run", probes), ("after warm-up", [p for p in probes if p.sent_s >= warmup_s])):
        seen = sorted(p.correlated_s for p in chosen if p.correlated_s is not None)
        stored = sorted(p.stored_s for p in chosen if p.stored_s is not None)
        lost = [p for p in chosen if p.correlated_s is None]

        def cell(p: float) -> str:
            text = f"{percentile(seen, p) * 1000:,.0f} ms" if seen else "–"
            return text + (f" [dim]({percentile(stored, p) * 1000:,.0f})[/dim]" if stored else "")

        latency.add_row(title, str(len(chosen)), cell(50), cell(95), cell(100), str(len(lost)))
    console.print(latency)
    lost = [p for p in probes if p.correlated_s is None]
    if lost:
        failures.append(f"{len(lost)} of {len(probes)} probes never became visible (first: {lost[0].error}, "
                        f"request {lost[0].request_id} at {lost[0].sent_s:.0f} s)")

    sent_rate = statistics.fmean(s.requests_per_s for s in samples[1:]) if len(samples) > 1 else 0.0
    console.print(f"Traffic: {sent_rate:.1f} requests/s sent on average (asked {args.rate:g}), "
                  f"{records_per_s:,.0f} records/s; {ran_s / 60:.1f} of {args.warmup_minutes + args.minutes:g} minutes"
                  + (" (stopped early)" if interrupted else "") + f"; machine: {os.cpu_count()} cores, load average "
                  f"{statistics.fmean(s.load for s in samples) if samples else 0:.1f} (max "
                  f"{max((s.load for s in samples), default=0):.1f}).")
    if died:
        failures.insert(0, died)
    if traffic_error:
        failures.insert(0, f"the traffic stopped: {traffic_error}")
    return failures, bool(memory)


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30,
                        help="how long memory is judged, after the warm-up (default 30)")
    parser.add_argument("--rate", type=float, default=150,
                        help="requests per wall second, steady (≈ 4.3 spans and events each; default 150)")
    parser.add_argument("--every", type=float, default=30, help="seconds between samples (default 30)")
    parser.add_argument("--warmup-minutes", type=float,
                        help="traffic before memory is judged (default 15, at least the worker's "
                             "correlation_retain_s)")
    parser.add_argument("--out", type=Path, default=Path("out/soak"), help="where each run's directory goes")
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.every <= 0 or (args.warmup_minutes or 0) < 0:
        parser.error("--minutes, --rate and --every must be above 0, --warmup-minutes 0 or above")

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # a log file follows each row
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file: no wrapping of the rows
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="supportlens-soak-"))
    settings = soak_settings(load_settings(), stamp, state_dir)
    if args.warmup_minutes is None:
        args.warmup_minutes = max(WARMUP_S, settings.correlation_retain_s) / 60
    warmup_s = args.warmup_minutes * 60
    run_s = warmup_s + args.minutes * 60

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill <pid>` ends the soak like Ctrl-C: report, clean up
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (`&`)
    stop = threading.Event()
    serve: subprocess.Popen[bytes] | None = None
    processes: Processes | None = None
    samples: list[Sample] = []
    traffic: Traffic | None = None
    prober: Prober | None = None
    files = Files(out_dir)
    died = ""
    interrupted = False
    try:
        console.print(f"[bold]Soak[/bold]: {args.rate:g} requests/s of normal traffic, {args.warmup_minutes:g} min "
                      f"of warm-up, then {args.minutes:g} min over which memory is judged; "
                      f"a sample every {args.every:g} s")
        console.print(f"Kafka {settings.kafka_bootstrap}, topics {settings.topic_prefix}*, state {state_dir}, "
                      f"support API {settings.support_url}; files in {out_dir}/")
        provision(settings)
        serve = start_serve(settings, out_dir / "serve.log")
        wait_ready(serve, out_dir / "serve.log", console)
        processes = Processes(serve.pid)
        lag = Lag(settings)
        world = build_world(SEED, USERS)
        started = time.monotonic()
        traffic = Traffic(settings, world, args.rate, stop)
        prober = Prober(settings, world, started, stop)
        traffic.start()
        prober.start()
        end = started + run_s
        last_t, last_requests, last_records, probes_seen = 0.0, 0, 0, 0
        while True:
            t = time.monotonic() - started
            probes = prober.taken()
            now_requests, now_records = traffic.requests, traffic.records
            span = max(t - last_t, 1e-9)
            sample = Sample(
                t_s=t, at=datetime.now().isoformat(timespec="seconds"),
                phase="warm-up" if t < warmup_s else "steady",
                processes=processes.sample(), lag=lag.sample(),
                requests_per_s=(now_requests - last_requests) / span if samples else 0.0,
                records_per_s=(now_records - last_records) / span if samples else 0.0,
                load=os.getloadavg()[0],
                probes=probes[probes_seen:],
            )
            last_t, last_requests, last_records, probes_seen = t, now_requests, now_records, len(probes)
            samples.append(sample)
            files.add(sample)
            console.print(sample_table(sample, header=len(samples) % 20 == 1))
            if died or traffic.error or time.monotonic() >= end:
                break
            deadline = min(end, started + len(samples) * args.every)
            while time.monotonic() < deadline and not died and not traffic.error:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                if serve.poll() is not None:
                    died = f"the pipeline died: serve exited with code {serve.returncode} (see {out_dir / 'serve.log'})"
                elif not processes.worker_alive():
                    died = f"the pipeline died: its worker is gone (see {out_dir / 'serve.log'})"
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]stopped: reporting what was measured[/]")
    except UserError as exc:
        died = exc.message + (f" ({exc.hint})" if exc.hint else "")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up below must run to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        for thread in (traffic, prober):
            if thread is not None and thread.is_alive():
                thread.join(15)
        if serve is not None:
            with console.status("stopping the pipeline…"):
                stop_pipeline(serve, processes)
        files.close()

    failures, judged = report(console, samples, prober.taken() if prober else [], args, warmup_s, died,
                              traffic.error if traffic else "", interrupted)
    with console.status("deleting the soak's topics, consumer groups and state…"):
        try:
            leftovers = delete_namespace(settings)
        except Exception as exc:  # noqa: BLE001 - e.g. the broker is gone: say what is left behind
            leftovers = [f"the namespace {settings.topic_prefix}* ({exc})"]
        shutil.rmtree(state_dir, ignore_errors=True)
    for leftover in leftovers:
        console.print(f"[yellow]could not delete[/] {leftover}")
    console.print(f"Samples: {files.csv_path}, {files.jsonl_path}; probes: {files.probes_path}; "
                  f"pipeline log: {out_dir / 'serve.log'}")
    if failures:
        console.print("[bold red]SOAK FAILED[/]: " + "; ".join(failures) + ".")
        return 1
    if not judged:
        console.print("[bold yellow]SOAK NOT JUDGED[/]: it stopped before memory could be compared after warm-up.")
        return 130 if interrupted else 1
    if interrupted:  # what held for a part of the run is no pass for the whole
        console.print(f"[bold yellow]SOAK STOPPED EARLY[/] after {samples[-1].t_s / 60:.1f} of "
                      f"{args.warmup_minutes + args.minutes:g} "
                      "minutes: nothing failed up to then, which is not a pass.")
        return 130
    console.print(f"[bold green]SOAK PASSED[/]: every process's memory stayed within {GROWTH_LIMIT:.0%} after "
                  f"warm-up, the pipeline stayed up and kept up, and every probe became visible.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
