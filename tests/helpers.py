"""Helpers for tests that run the CLI as a user would."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from supportlens.config import Settings


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def supportlens_cmd(*args: str) -> list[str]:
    """The installed console script, run as a user would."""
    script = Path(sys.executable).with_name("supportlens")
    return [str(script), *args]


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a subprocess resolve the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    env.update(settings.as_env(), NO_COLOR="1", COLUMNS="200")
    # no fixed /metrics ports: processes of parallel or restarted tests would fight over them
    env.update(SUPPORTLENS_WORKER_METRICS_PORT="0", SUPPORTLENS_SINK_METRICS_PORT="0")
    return env


class WorkerProcess:
    """A real ``supportlens worker`` subprocess, its log in a file."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        import subprocess

        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            supportlens_cmd("worker"), env={**settings_env(settings), **env}, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 90.0) -> "WorkerProcess":
        import time

        deadline = time.monotonic() + timeout
        while b"Worker ready" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout} s:\n{self.tail()}")
            time.sleep(0.2)
        return self

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
        self._log.close()


def spy_on_compare_digest(monkeypatch) -> list[tuple]:
    """Every ``hmac.compare_digest`` call from now on, as ``(a, b)``, still answered by the real one."""
    import hmac

    calls: list[tuple] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


def spans_in_records(records, partitions: int | None = None) -> list:
    """The spans of span-topic records (``OutRecord``-like: ``key``, ``value``, optional
    ``partition``), in order, after checking each record is placed as the batch contract says:
    keyed by its first span's request id, and every span's request id on its partition."""
    from supportlens.span_batches import decode_spans, partition_of

    spans = []
    for record in records:
        decoded = decode_spans(record.value)
        assert not decoded.rejected, decoded.rejected
        assert decoded.spans and record.key == decoded.spans[0].request_id
        if partitions is not None:
            where = {partition_of(span.request_id.encode(), partitions) for span in decoded.spans}
            named = getattr(record, "partition", None)
            assert len(where) == 1 and named in (None, *where), (where, named, record.key)
        spans.extend(decoded.spans)
    return spans


def own_database(dsn: str, state_dir: Path) -> tuple[Settings, Any]:
    """Settings for a database of its own on ``dsn`` (the environment's SUPPORTLENS_* ignored),
    and a client with the tables migrated: for module fixtures, which cannot use monkeypatch."""
    import uuid

    import pytest

    from supportlens import store
    from supportlens.config import load_settings

    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
            env.delenv(key)
        settings = load_settings(clickhouse_dsn=dsn, clickhouse_database=f"t_{uuid.uuid4().hex[:10]}", state_dir=state_dir)
    client = store.connect(settings)
    store.migrate(client, settings)
    return settings, client


def insert_records(client: Any, topic: str, records: Any) -> None:
    """Store records of a logical topic as the sink would (its row mapping), without Kafka."""
    from sinks.clickhouse_rows import MAPPINGS, RecordMeta, to_row
    from supportlens.contracts import encode

    mapping = MAPPINGS[topic]
    rows = [to_row(topic, encode(r), RecordMeta(0, i, 0), 1_048_576) for i, r in enumerate(records)]
    if rows:
        client.insert(mapping.table, rows, column_names=mapping.columns)


def replay_start(duration_s: float, ended_ago_s: float, local_hour: int = 14, utc_offset_h: int = 8):
    """The start of a replayed run that ends at least ``ended_ago_s`` before now and begins at
    ``local_hour`` in a region ``utc_offset_h`` from UTC (cn-east, whose ISP outage the tests
    replay). The simulator's traffic follows the local time of day (a tenth of the peak at
    04:00): a run placed just before now would test another traffic every hour the suite runs."""
    from datetime import datetime, timedelta, timezone

    latest = datetime.now(timezone.utc) - timedelta(seconds=duration_s + ended_ago_s)
    local = latest + timedelta(hours=utc_offset_h)
    start_local = local.replace(hour=local_hour, minute=0, second=0, microsecond=0)
    if start_local > local:
        start_local -= timedelta(days=1)
    return start_local - timedelta(hours=utc_offset_h)
