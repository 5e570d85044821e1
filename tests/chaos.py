"""Fault injection for the chaos tests (``tests/test_chaos.py``).

- :class:`CrashableBroker`: a Kafka broker of a test module's own that can be crashed and
  started again on the same ports and data, never the session's broker;
- :class:`Service`: a ``supportlens`` command as a process, the way an operator runs it;
- :class:`Traffic` and :class:`AppClient`: apps and backends sending spans and fault reports
  to the gateway over HTTP. A client retries a 503 after its ``Retry-After``, as a real one
  would, and remembers every record the gateway acknowledged: what the pipeline must store.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from helpers import free_port, settings_env, supportlens_cmd
from supportlens.config import Settings

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = ROOT / "deploy" / "local" / "kafka.sh"


# --- the broker --------------------------------------------------------------------------


class CrashableBroker:
    """A single-node Kafka from the project's runner (``deploy/local/kafka.sh``) on ports and a
    state directory of its own. :meth:`crash` kills it; :meth:`start` brings it back on the same
    ports and data, so what it had acknowledged is there again, as after a real broker crash."""

    def __init__(self, state_dir: Path) -> None:
        self.port = free_port()
        self._env = {**os.environ, "SUPPORTLENS_STATE_DIR": str(state_dir), "KAFKA_PORT": str(self.port),
                     "KAFKA_CONTROLLER_PORT": str(free_port())}
        self._pid_file = state_dir / "kafka" / "kafka.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the broker, or leave a running one be; returns once it serves."""
        subprocess.run([str(KAFKA_SCRIPT), "start"], env=self._env, check=True)

    def crash(self) -> None:
        """SIGKILL, as the OOM killer or a lost machine stops a broker: no controlled shutdown, no
        goodbye to clients. Returns once the process is gone and its port closed."""
        pid = self._pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _is_broker(pid) or _accepts(self.port):
            assert time.monotonic() < deadline, f"the broker (pid {pid}) still runs after SIGKILL"
            time.sleep(0.05)

    def freeze(self) -> None:
        """SIGSTOP, as a long GC pause or a frozen VM stalls a broker: connections stay open and
        requests wait, unanswered, until :meth:`thaw`."""
        os.kill(self._pid(), signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen broker go on (nothing to do when it is not running)."""
        if self._pid_file.exists() and _is_broker(self._pid()):
            os.kill(self._pid(), signal.SIGCONT)

    def stop(self) -> None:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=self._env, check=False)

    def _pid(self) -> int:
        return int(self._pid_file.read_text().strip())


def _is_broker(pid: int) -> bool:
    try:  # a killed broker nobody reaped yet is a zombie: an empty command line
        return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- processes ---------------------------------------------------------------------------

# Lines a client writes every few milliseconds while its broker is away: left out of the
# tails shown in failures, which should show what happened, not the retries.
_RECONNECT_NOISE = ("Connection refused", "Unable connect to node", "Unable to update metadata",
                    "Failed fetch messages", "NodeNotReadyError", "Connect call failed")


class Service:
    """``supportlens <args>`` as a subprocess with the settings' environment, its output in ``log``."""

    def __init__(self, settings: Settings, log: Path, *args: str) -> None:
        self.log = log
        self.name = " ".join(args)
        self._out = log.open("ab")
        self.proc = subprocess.Popen(supportlens_cmd(*args), env=settings_env(settings),
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def wait_for(self, *lines: str, timeout: float = 120.0) -> "Service":
        """Return once every one of ``lines`` appeared in the output."""
        deadline = time.monotonic() + timeout
        while not all(line.encode() in self.log.read_bytes() for line in lines):
            assert self.alive, f"`supportlens {self.name}` exited with {self.proc.returncode}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"`supportlens {self.name}` not ready after {timeout} s:\n{self.tail()}"
            time.sleep(0.2)
        return self

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def tail(self, lines: int = 60) -> str:
        kept = [line for line in self.lines() if not any(noise in line for noise in _RECONNECT_NOISE)]
        return "\n".join(kept[-lines:])

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


# --- clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """An answer other than 2xx."""

    path: str
    status: int
    retry_after: str | None
    content_type: str
    body: str


class AppClient:
    """One app's HTTP connection to the gateway.

    :meth:`post` retries until the gateway acknowledges with 2xx: after a 503 it waits what
    ``Retry-After`` says; when the gateway does not answer at all, a second (and counts it).
    Any other answer is a bug of the test or the gateway: it raises.
    """

    def __init__(self, base_url: str, give_up_s: float = 300.0) -> None:
        self.base_url = base_url
        self.give_up_s = give_up_s
        self.http = requests.Session()
        self.refusals: list[Refusal] = []
        self.unanswered: list[str] = []

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        deadline = time.monotonic() + self.give_up_s
        while True:
            try:
                # longer than the gateway's wait for Kafka's acknowledgement (8 s)
                response = self.http.post(f"{self.base_url}{path}", json=body, timeout=30)
            except requests.RequestException as exc:
                self.unanswered.append(f"{path}: {type(exc).__name__}: {exc}")
                wait = 1.0
            else:
                if response.ok:
                    return response
                self.refusals.append(Refusal(path, response.status_code, response.headers.get("Retry-After"),
                                             response.headers.get("Content-Type", ""), response.text[:500]))
                if response.status_code != 503:
                    raise AssertionError(f"POST {path} answered {response.status_code}: {response.text[:500]}")
                wait = float(response.headers.get("Retry-After") or 1)
            if time.monotonic() + wait > deadline:
                raise AssertionError(f"POST {path} not accepted within {self.give_up_s} s; last: "
                                     f"{self.refusals[-1:] or self.unanswered[-1:]}")
            time.sleep(wait)


def otlp_export(request_id: str, side: str, user_id: str, start_ns: int, failed: bool) -> dict[str, Any]:
    """An OTLP/JSON export of one span: a consenting shop app's client span or the payment backend's."""
    resource = ({"service.name": "payment", "supportlens.side": "server"} if side == "server"
                else {"service.name": "shop-app", "supportlens.consent": "granted", "enduser.id": user_id})
    attributes = [{"key": "http.request_id", "value": {"stringValue": request_id}},
                  {"key": "http.response.status_code", "value": {"intValue": "503" if failed else "200"}}]
    span = {"traceId": uuid.uuid4().hex, "spanId": uuid.uuid4().hex[:16], "kind": 3 if side == "client" else 2,
            "name": "POST /v1/payments/confirm", "startTimeUnixNano": str(start_ns),
            "endTimeUnixNano": str(start_ns + (300_000_000 if side == "client" else 200_000_000)),
            "attributes": attributes, "status": {"code": 2 if failed else 1}}
    return {"resourceSpans": [{"resource": {"attributes": [{"key": k, "value": {"stringValue": v}}
                                                           for k, v in resource.items()]},
                               "scopeSpans": [{"spans": [span]}]}]}


def fault_report(report_id: str, user_id: str, request_id: str) -> dict[str, Any]:
    """A one-click report as the app sends it; the app picks the id, so a retry keeps it."""
    return {"report_id": report_id, "user_id": user_id, "locale": "en", "app_version": "5.3.1", "platform": "ios",
            "request_ids": [request_id], "error_code": "UPSTREAM_ERROR", "user_message": "Payment keeps failing."}


@dataclass
class Acknowledged:
    """What the gateway answered 2xx for, per user: what must land, each exactly once."""

    requests: dict[str, list[str]] = field(default_factory=dict)  # user → request ids, both spans acknowledged
    reports: dict[str, str] = field(default_factory=dict)  # report id → the request it names
    straddling: list[str] = field(default_factory=list)  # requests whose spans were refused in between

    @property
    def request_ids(self) -> set[str]:
        return {r for ids in self.requests.values() for r in ids}

    @property
    def spans(self) -> set[tuple[str, str]]:
        return {(r, side) for r in self.request_ids for side in ("client", "server")}


class Traffic:
    """Users of an app, each on a thread of its own: every request sends the app's client span and
    the backend's server span (two exports, as two processes would); every ``report_every``-th
    request fails, and its user files a fault report naming it.

    :meth:`stop` lets every user finish the request in hand, retries included, so every record
    begun is acknowledged in the end.
    """

    def __init__(self, gateway_url: str, users: int = 4, report_every: int = 5, pause_s: float = 0.1) -> None:
        self.users = [f"chaos-user-{i}" for i in range(users)]
        self.clients = {user: AppClient(gateway_url) for user in self.users}
        self.acknowledged = Acknowledged(requests={user: [] for user in self.users})
        self._report_every = report_every
        self._pause_s = pause_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(user,), name=user, daemon=True)
                         for user in self.users]

    def start(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def acknowledged_requests(self) -> int:
        with self._lock:
            return sum(len(ids) for ids in self.acknowledged.requests.values())

    def wait_for_requests(self, count: int, timeout: float = 120.0) -> None:
        """Return once ``count`` requests were acknowledged in all (raises what a user thread raised)."""
        deadline = time.monotonic() + timeout
        while self.acknowledged_requests() < count:
            assert not self._errors, self._errors[0]
            assert time.monotonic() < deadline, f"{self.acknowledged_requests()} of {count} requests acknowledged"
            time.sleep(0.1)

    def stop(self, timeout: float = 120.0) -> Acknowledged:
        """Let every user finish the request in hand; what was acknowledged (raises what a user thread raised)."""
        self.halt(timeout)
        for thread in self._threads:
            assert not thread.is_alive(), f"{thread.name} did not finish its request"
        if self._errors:
            raise self._errors[0]
        return self.acknowledged

    def halt(self, timeout: float = 120.0) -> None:
        """Stop sending, raising nothing: for clean-up."""
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)

    @property
    def refusals(self) -> list[Refusal]:
        return [refusal for client in self.clients.values() for refusal in client.refusals]

    @property
    def unanswered(self) -> list[str]:
        return [failure for client in self.clients.values() for failure in client.unanswered]

    def _run(self, user: str) -> None:
        client = self.clients[user]
        rng = random.Random(user)
        sent = 0
        try:
            while not self._stop.is_set():
                sent += 1
                request_id = str(uuid.uuid4())
                failed = sent % self._report_every == 0
                refused_before = len(client.refusals)
                start_ns = time.time_ns()
                client.post("/v1/traces", otlp_export(request_id, "client", user, start_ns, failed))
                client.post("/v1/traces", otlp_export(request_id, "server", user, start_ns + 50_000_000, failed))
                report_id = str(uuid.uuid4())
                if failed:
                    client.post("/v1/reports", fault_report(report_id, user, request_id))
                with self._lock:
                    self.acknowledged.requests[user].append(request_id)
                    if failed:
                        self.acknowledged.reports[report_id] = request_id
                    if len(client.refusals) > refused_before:
                        self.acknowledged.straddling.append(request_id)
                time.sleep(self._pause_s * rng.uniform(0.5, 1.5))
        except BaseException as exc:  # handed to the test by wait_for_requests / stop
            self._errors.append(exc)


def refusal_problems(refusals: Iterable[Refusal]) -> list[str]:
    """What is wrong with the gateway's refusals: each must be a 503 with a Retry-After in
    seconds and a JSON error that tells the client to retry."""
    problems = []
    for refusal in refusals:
        if refusal.status != 503:
            problems.append(f"{refusal.path}: {refusal.status} {refusal.body}")
        elif not (refusal.retry_after or "").isdigit() or int(refusal.retry_after or 0) <= 0:
            problems.append(f"{refusal.path}: Retry-After {refusal.retry_after!r}")
        elif refusal.content_type != "application/json" or '"error"' not in refusal.body or "retry" not in refusal.body:
            problems.append(f"{refusal.path}: {refusal.content_type} {refusal.body}")
    return problems
