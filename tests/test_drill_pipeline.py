"""Issue #6, end to end on the real parts: a drill of a recorded incident declares a drill incident
and sends nothing to real customer endpoints.

A real `supportlens serve` (worker, ClickHouse sink, support API) sees a simulated payment outage
declared and resolved; every VIP account's webhook points at a CUSTOMER receiver. `supportlens
drill` then replays the incident from ClickHouse (through serve's API) into Kafka, and a real
`supportlens notify` delivers the outbox. The drill must declare its own incident (marked drill,
the real one untouched), and its notices — addressed to the customers — must reach only the DRILL
receiver, signed. Both receivers are aiohttp on loopback and verify every signature.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import SecretStr

from conftest import subprocess_dsn
from helpers import free_port, settings_env, supportlens_cmd
from supportlens.demo.receiver import Received, WebhookReceiver
from sinks.notifications import READY_LINE as NOTIFY_READY
from supportlens.config import Settings, load_settings
from supportlens.contracts import DeliveryAttempt, IncidentEvent, Notification, decode
from supportlens.serve import READY_LINE as SERVE_READY
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.simulator.world import build_world
from supportlens.store.lookup import LookupInputError
from supportlens.store.recorded import RecordedIncident
from supportlens.support.access import RemoteSupport
from supportlens.topic_reader import read_range
from supportlens.topics import provision

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]
SEED, USERS, DURATION = 11, 3000, 300
ENDED_AGO_S = 180  # the run ended this long ago: its cool-down is behind the worker's clock once read
SECRET = "whsec-" + uuid.uuid4().hex
SERVE_ENV = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5",
             "SUPPORTLENS_SURGE_WARMUP_S": "60", "SUPPORTLENS_WORKER_METRICS_PORT": "0"}
FINAL = {"delivered", "dead_lettered", "rate_limited", "skipped_drill", "no_channel"}
T = TypeVar("T")


# -- webhook receivers -------------------------------------------------------------------------

# -- real processes --------------------------------------------------------------------------

class Process:
    """A real supportlens subprocess, its output in a log file; ``started`` waits for its ready line."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        # in the test's directory: the worker's Faust data directory is created where it runs
        self.proc = subprocess.Popen(supportlens_cmd(*args), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=log_path.parent)

    def started(self, *lines: str, timeout: float = 90.0) -> "Process":
        deadline = time.monotonic() + timeout
        while not all(line.encode() in self.log_path.read_bytes() for line in lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.log_path.name}: no {lines} (exit {self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.2)
        return self

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode


def poll(what: str, check: Callable[[], T | None], timeout: float, why: Callable[[], str],
         alive: tuple[Process, ...] = ()) -> T:
    """``check()``'s first truthy answer; AssertionError naming ``what`` and ``why()`` at the deadline,
    or at once when a process of ``alive`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        dead = [p.log_path.name for p in alive if p.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            cause = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
            raise AssertionError(f"{cause} while waiting for {what}\n{why()}")
        time.sleep(1.0)


def on_topic(settings: Settings, logical: str, kind: type[T]) -> list[T]:
    return [decode(m.value(), kind) for m in read_range(settings, [settings.topic(logical)])]


def final_outcomes(settings: Settings) -> dict[str, list[DeliveryAttempt]]:
    """Every notification id with a final delivery outcome, and all its attempts."""
    attempts: dict[str, list[DeliveryAttempt]] = {}
    for attempt in on_topic(settings, "deliveries", DeliveryAttempt):
        attempts.setdefault(attempt.notification_id, []).append(attempt)
    return {nid: a for nid, a in attempts.items() if any(x.outcome in FINAL for x in a)}


def import_vip_accounts(settings: Settings, customer: WebhookReceiver, path: Path) -> set[str]:
    """Every VIP account of the simulated world gets a webhook on CUSTOMER, through the CLI."""
    vips = sorted((a for a in build_world(SEED, USERS).accounts if a.tier == "vip"), key=lambda a: a.account_id)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["account_id", "name", "tier", "locale", "channel", "webhook_url"])
        for account in vips:
            writer.writerow([account.account_id, account.name, "vip", account.locale, "webhook",
                             customer.url(f"/hooks/{account.account_id}")])
    done = subprocess.run(supportlens_cmd("accounts", "import", str(path)), env=settings_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"imported {len(vips)} accounts ({len(vips)} VIP)" in done.stdout, done.stdout
    return {a.account_id for a in vips}


def recorded_or_none(remote: RemoteSupport, incident_id: str) -> RecordedIncident | None:
    """The incident as serve's API reads it from ClickHouse, or None while the sink has not written it."""
    try:
        return remote.recorded_incident(incident_id)
    except LookupInputError:
        return None


# -- the test ----------------------------------------------------------------------------------

def test_a_drill_of_a_recorded_incident_declares_a_drill_incident_and_messages_no_customer(kafka, clickhouse, tmp_path):
    settings = load_settings(
        kafka_bootstrap=kafka.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}.", partitions=3,
        clickhouse_dsn=subprocess_dsn(clickhouse, tmp_path), clickhouse_database=f"t_{uuid.uuid4().hex[:10]}",
        state_dir=tmp_path / "state", sink_batch_rows=5000, sink_flush_s=0.2, support_port=free_port(),
    )
    provision(settings)
    remote = RemoteSupport(settings.support_url)
    with WebhookReceiver(SECRET) as customer, WebhookReceiver(SECRET) as drill_hook:
        delivery = settings.model_copy(update=dict(
            notify_webhook_secret=SecretStr(SECRET), drill_webhook_url=drill_hook.url("/drills"),
            notify_backoff_first_s=0.2, notify_backoff_max_s=0.5, notify_metrics_port=0,
            notify_max_attempts=1,  # the simulator's dead addresses are dead-lettered at once
            smtp_port=free_port(),  # nobody listens: e-mail to the simulator's addresses is refused
        ))
        serve = Process(["serve"], {**settings_env(settings), **SERVE_ENV}, tmp_path / "serve.log")
        notify: Process | None = None
        try:
            serve.started(SERVE_READY, "Worker ready")

            # 1. a real payment outage, recorded: declared, resolved, in ClickHouse
            run = simulate(settings, SimulateOptions(
                "service-outage", rate=50, duration_s=DURATION, seed=SEED, users=USERS, speed=0,
                start=datetime.now(timezone.utc) - timedelta(seconds=DURATION + ENDED_AGO_S),
                labels_path=tmp_path / "labels.jsonl"))
            vips = import_vip_accounts(settings, customer, tmp_path / "accounts.csv")

            def incidents() -> list[IncidentEvent]:
                return on_topic(settings, "incidents", IncidentEvent)

            def story() -> str:
                return "incidents: " + repr([(e.incident_id, e.transition, e.root_key, e.drill) for e in incidents()]) \
                    + "\n--- serve log ---\n" + serve.tail()

            real = poll("the real outage to resolve", lambda: next(
                (e for e in incidents() if e.transition == "resolved" and not e.drill), None), 180, story, (serve,))
            assert real.dimensions.get("service") == "payment", real
            spans = run.counts["client-spans"] + run.counts["server-spans"]

            def recorded() -> bool:
                try:
                    incident = remote.recorded_incident(real.incident_id)
                except LookupInputError:
                    return False
                return incident.state == "resolved" and remote.table_counts().rows["spans"] == spans

            poll("the sink to record the incident and its spans", recorded, 120,
                 lambda: f"tables: {remote.table_counts().rows}, expected {spans} spans\n{serve.tail()}", (serve,))

            # 2. the outbox delivered: the real incident's notices are final before the drill begins
            notify = Process(["notify"], settings_env(delivery), tmp_path / "notify.log").started(NOTIFY_READY, timeout=60)

            def backlog_final() -> bool:
                written = {n.notification_id for n in on_topic(settings, "notifications", Notification)}
                return bool(written) and written <= set(final_outcomes(settings))

            poll("the real incident's notices to be final", backlog_final, 90, notify.tail, (serve, notify))
            real_events = [e for e in incidents() if not e.drill]
            before_drill = len(customer.received)
            told_for_real = {r.payload["account_id"] for r in customer.received
                             if r.payload["incident_id"] == real.incident_id}
            # a positive control: the customer endpoint works, and real notices reach it
            assert told_for_real and told_for_real <= vips, told_for_real
            assert all(r.signature_ok and not r.payload["drill"] for r in customer.received)

            # 3. the drill: replayed from ClickHouse through serve's API, as fast as possible (the
            #    hardest case for the worker: the whole window arrives within seconds)
            drilled = subprocess.run(
                supportlens_cmd("drill", "--incident", real.incident_id, "--speed", "0", "--lead", "60s",
                                "--tail", "1m", "--drill-id", "e2e"),
                env=settings_env(settings), capture_output=True, text=True, timeout=180)
            assert drilled.returncode == 0, drilled.stdout + drilled.stderr
            assert f"drill e2e of {real.incident_id}" in drilled.stdout, drilled.stdout

            drill = poll("the drill incident to be declared", lambda: next(
                (e for e in incidents() if e.drill and e.transition == "declared"), None), 120, story, (serve, notify))

            def drill_notices() -> list[Notification]:
                return [n for n in on_topic(settings, "notifications", Notification) if n.incident_id == drill.incident_id]

            notices = poll("the drill incident's notices", drill_notices, 60, story, (serve, notify))

            def drill_delivered() -> list[Received]:
                final = final_outcomes(settings)
                got = [r for r in drill_hook.received if r.payload["incident_id"] == drill.incident_id]
                ids = {n.notification_id for n in notices}
                return got if ids <= set(final) and ids <= {r.payload["notification_id"] for r in got} else []

            at_drill = poll("the drill notices at the drill webhook", drill_delivered, 60,
                            lambda: f"drill webhook got {len(drill_hook.received)}\n{notify.tail()}", (serve, notify))
            listed = subprocess.run(supportlens_cmd("incidents", "--json"), env=settings_env(settings),
                                    capture_output=True, check=True, timeout=120)
            in_store = poll("the sink to record the drill incident", lambda: recorded_or_none(remote, drill.incident_id),
                            60, serve.tail, (serve,))
        finally:
            notify_code = notify.stop() if notify is not None else 0
            serve_code = serve.stop()
        notices = drill_notices()  # all of them, also any written since
        final = final_outcomes(settings)
        after_drill = customer.received[before_drill:]
        at_drill_all = drill_hook.received
    print(f"\nreal {real.incident_id} {real.severity}: {len(told_for_real)} VIP accounts told; "
          f"drill {drill.incident_id} ({drill.reason}): {len(notices)} notices, {len(at_drill_all)} at the drill webhook")

    assert notify_code == 0 and serve_code == 0, (notify_code, serve_code)
    # the drill declared an incident of its own, marked, in the outage's dimension
    assert drill.incident_id != real.incident_id
    assert drill.dimensions.get("service") == "payment", drill.dimensions
    assert drill.declared_by == "policy" and drill.reason
    assert sum(e.drill and e.transition == "declared" for e in incidents()) == 1, "the drill declared more than one"

    # zero messages to customers: nothing at all since the drill began, let alone about it
    assert after_drill == [], [(r.path, r.payload["notification_id"]) for r in after_drill]
    assert not any(drill.incident_id.encode() in r.body for r in customer.received)

    # its notices are drills, addressed to the customers, and went only to the drill channel, signed
    assert notices and all(n.drill for n in notices), [(n.notification_id, n.drill) for n in notices]
    assert {n.account_id for n in notices} <= vips
    assert all(n.channel == "webhook" and n.to == customer.url(f"/hooks/{n.account_id}") for n in notices)
    assert all(r.signature_ok and r.path == "/drills" for r in at_drill_all)
    assert all(r.payload["drill"] is True for r in at_drill)
    for n in notices:
        for attempt in final.get(n.notification_id, []):
            assert (attempt.drill, attempt.channel, attempt.outcome) == (True, "webhook", "delivered"), attempt
            assert attempt.detail.startswith("drill channel: HTTP 200"), attempt.detail

    # the real incident was left alone: no non-drill transition since the drill began
    assert [e for e in incidents() if not e.drill] == real_events
    assert max((e for e in real_events if e.incident_id == real.incident_id), key=lambda e: e.sequence) == real

    # the lookups tell the drill apart
    current = {e["incident_id"]: e for e in json.loads(listed.stdout)}
    assert current[drill.incident_id].get("drill") is True, current[drill.incident_id]
    assert not current[real.incident_id].get("drill"), current[real.incident_id]
    assert in_store.drill and in_store.dimensions.get("service") == "payment", in_store
