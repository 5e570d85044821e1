"""``supportlens serve`` and ``supportlens sink``: the processes that own ClickHouse writes.

``serve`` is the one-machine deployment around the embedded store (which only one
process may open): in this process the ClickHouse sink (a thread) and the support API
(the event loop); beside it the stream worker as a child process. The worker never
touches ClickHouse, and as its own process it gets its own core and its own event loop
— Faust's worker owns the loop and the signals of the process it runs in. If a part
dies, ``serve`` stops the rest and exits non-zero, for a supervisor to restart it.

With a server DSN, run ``worker``, ``sink`` and ``serve --no-worker --no-sink`` (just
the API) as separate processes and scale each out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client import REGISTRY

from sinks.clickhouse_rows import MAPPINGS
from sinks.clickhouse_sink import ClickHouseSink, tune_gc_for_sink
from supportlens import store
from supportlens.config import Settings
from supportlens.gateway.server import open_site
from supportlens.metrics import process_metrics, serve_metrics
from supportlens.support.access import DirectSupport
from supportlens.support.api import build_support_app
from supportlens.topics import require_topics

log = logging.getLogger(__name__)

READY_LINE = "supportlens serve ready"


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _open_store(settings: Settings) -> None:
    client = store.connect(settings)
    applied = store.migrate(client, settings)
    if applied:
        log.info("ClickHouse %s: applied %s", store.redact_dsn(settings.clickhouse_dsn), ", ".join(applied))


def run_sink_process(settings: Settings, loglevel: str = "info") -> None:
    """``supportlens sink``: the ClickHouse sink alone, until SIGINT/SIGTERM (then a last flush)."""
    _logging(loglevel)
    require_topics(settings, tuple(MAPPINGS))
    _open_store(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    sink = ClickHouseSink(settings, store.connect(settings, create_database=False), process_metrics(), stop)
    serve_metrics(settings, settings.sink_metrics_port, "sink")
    tune_gc_for_sink()
    log.info("sink ready: ClickHouse %s", store.redact_dsn(settings.clickhouse_dsn))
    sink.run()
    log.info("sink stopped after writing %d rows", sink.rows_written)


def run_serve(settings: Settings, *, with_worker: bool = True, with_sink: bool = True, loglevel: str = "info",
              worker_log: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM or until a part dies (exit code 1 then)."""
    _logging(loglevel)
    if with_sink:
        require_topics(settings, tuple(MAPPINGS))
    _open_store(settings)
    metrics = process_metrics()
    stop = threading.Event()
    sink_thread = None
    if with_sink:
        # its own client: the API's queries and the sink's inserts never share a connection
        sink = ClickHouseSink(settings, store.connect(settings, create_database=False), metrics, stop)
        sink_thread = threading.Thread(target=sink.run, name="clickhouse-sink", daemon=True)
        sink_thread.start()
    worker = _start_worker(settings, loglevel, worker_log) if with_worker else None
    tune_gc_for_sink()
    try:
        failed = asyncio.run(_serve_api(settings, sink_thread, worker))
    finally:
        stop.set()
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if sink_thread is not None:
            sink_thread.join(60)
    if failed:
        raise SystemExit(1)


def _start_worker(settings: Settings, loglevel: str, log_path: Path | None) -> subprocess.Popen[bytes]:
    output = log_path.open("ab") if log_path else None
    return subprocess.Popen(
        [sys.executable, "-m", "supportlens", "worker", "--loglevel", loglevel],
        env={**os.environ, **settings.as_env()},
        stdout=output, stderr=subprocess.STDOUT if output else None,
    )


async def _serve_api(settings: Settings, sink_thread: threading.Thread | None,
                     worker: subprocess.Popen[bytes] | None) -> bool:
    """Run the API; True when it ended because a part died."""
    app = build_support_app(DirectSupport(store.connect(settings, create_database=False)), REGISTRY)
    runner = await open_site(app, settings.support_host, settings.support_port,
                             name="support API", env_prefix="SUPPORTLENS_SUPPORT")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    log.info("support API at %s; ClickHouse %s", settings.support_url, store.redact_dsn(settings.clickhouse_dsn))
    print(READY_LINE, flush=True)
    failed = False
    try:
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
            except TimeoutError:
                pass
            if worker is not None and worker.poll() is not None:
                log.error("the stream worker exited with code %s; stopping", worker.returncode)
                failed = True
                break
            if sink_thread is not None and not sink_thread.is_alive():
                log.error("the ClickHouse sink stopped; stopping")
                failed = True
                break
    finally:
        await runner.cleanup()
    return failed

