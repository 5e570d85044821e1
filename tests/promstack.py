"""A real Prometheus and Alertmanager for alerting tests, and a webhook receiver that records
what reaches it.

:class:`PromStack` starts, each with its own config and data directory on free loopback
ports: the webhook receiver (a thread), ``prometheus-alertmanager`` with the repo's
``alert_rules/alertmanager.yml`` (every webhook pointed at the receiver, groups sent at
once), and ``prometheus`` with the repo's rules, scraping the given targets every second
and sending to that Alertmanager. It waits until both answer ``/-/ready``; on exit it
stops both and, when the block raised, prints their logs. The :func:`prom_stack` fixture
does the same for a whole test (logs printed when the test failed).

The binaries come from Debian's packages (``deploy/local/services.sh``). The project has
no YAML library, so configs are written as JSON (which YAML reads) and the Alertmanager
config is rewritten as text; a change of its layout that the rewrite no longer matches
fails loudly here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "alert_rules" / "supportlens.rules.yml"
ALERTMANAGER_CONFIG = ROOT / "alert_rules" / "alertmanager.yml"
# The placeholder base of every webhook URL in alertmanager.yml; the path names the receiver.
PLACEHOLDER_WEBHOOK = "http://127.0.0.1:9099"


def binary(name: str) -> str:
    """The path of a Prometheus binary; fails the test with the install hint when missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run deploy/local/services.sh (make test does)")
    return path


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


@dataclass(frozen=True)
class Delivery:
    """One POST that reached the webhook receiver: its path and decoded JSON body."""

    path: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class ReceivedAlert:
    """One alert of an Alertmanager webhook payload, with the receiver it was sent to."""

    receiver: str
    path: str
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]


class WebhookReceiver:
    """An HTTP server on a free loopback port (in a thread) that records every POST."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode(errors="replace")}
                with receiver._lock:
                    receiver._deliveries.append(Delivery(self.path, payload))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, forever if it never ran
            self._server.shutdown()
        self._server.server_close()

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def alerts(self) -> Iterator[ReceivedAlert]:
        """Every alert of every payload received so far, in arrival order."""
        for delivery in self.deliveries():
            for alert in delivery.payload.get("alerts", []):
                yield ReceivedAlert(
                    receiver=delivery.payload.get("receiver", ""), path=delivery.path, status=alert.get("status", ""),
                    labels=alert.get("labels", {}), annotations=alert.get("annotations", {}),
                )


class ServerProcess:
    """A Prometheus or Alertmanager process, its output in a log file."""

    def __init__(self, name: str, argv: list[str], url: str, log_path: Path) -> None:
        self.name, self.url, self.log_path = name, url, log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once ``/-/ready`` answers 200; raises with the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def get(self, path: str) -> Any:
        return _get_json(f"{self.url}{path}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def prometheus_config(targets: Mapping[str, Sequence[str]], alertmanager: str | None) -> dict[str, Any]:
    """Prometheus' config: the repo's rules, 1 s scrapes and evaluations, one job per target list."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]} for job, addresses in targets.items()
        ],
    }
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


def start_prometheus(workdir: Path, targets: Mapping[str, Sequence[str]] | None = None,
                     alertmanager: str | None = None) -> ServerProcess:
    """Starts ``prometheus`` in ``workdir`` (config, data, log); the caller waits for ready and stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config(targets or {}, alertmanager), indent=2))
    address = f"127.0.0.1:{free_port()}"
    # Resend firing alerts every second (default 1m): the rules' first evaluation can come
    # before the notifier has discovered the Alertmanager, and that first send is dropped.
    argv = [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={address}", "--rules.alert.resend-delay=1s"]
    return ServerProcess("prometheus", argv, f"http://{address}", workdir / "prometheus.log")


def alertmanager_config(receiver_url: str) -> str:
    """The repo's Alertmanager config with every webhook sent to ``receiver_url`` (keeping each
    path) and groups notified at once and then every second."""
    text = ALERTMANAGER_CONFIG.read_text()
    rewrites = [
        (re.escape(PLACEHOLDER_WEBHOOK), receiver_url),
        (r"(?m)^(\s*group_wait:).*$", r"\1 0s"),
        (r"(?m)^(\s*group_interval:).*$", r"\1 1s"),
    ]
    for pattern, replacement in rewrites:
        text, count = re.subn(pattern, replacement, text)
        if count == 0:
            raise AssertionError(f"{ALERTMANAGER_CONFIG} no longer matches {pattern!r}: update tests/promstack.py")
    return text


def start_alertmanager(workdir: Path, receiver_url: str) -> ServerProcess:
    """Starts ``prometheus-alertmanager`` in ``workdir``, clustering off; the caller waits for ready and stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "alertmanager.yml"
    config.write_text(alertmanager_config(receiver_url))
    address = f"127.0.0.1:{free_port()}"
    argv = [binary("prometheus-alertmanager"), f"--config.file={config}", f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={address}", "--cluster.listen-address="]
    return ServerProcess("alertmanager", argv, f"http://{address}", workdir / "alertmanager.log")


@dataclass
class PromStack:
    """Prometheus → Alertmanager → webhook receiver, for one test. Use as a context manager
    or through the :func:`prom_stack` fixture."""

    workdir: Path
    targets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    receiver: WebhookReceiver = field(init=False, default_factory=WebhookReceiver)
    alertmanager: ServerProcess | None = field(init=False, default=None)
    prometheus: ServerProcess | None = field(init=False, default=None)

    def start(self) -> PromStack:
        self.receiver.start()
        self.alertmanager = start_alertmanager(self.workdir / "alertmanager", self.receiver.url)
        self.alertmanager.wait_ready()
        self.prometheus = start_prometheus(
            self.workdir / "prometheus", self.targets, self.alertmanager.url.removeprefix("http://")
        )
        self.prometheus.wait_ready()
        return self

    def stop(self) -> None:
        for server in (self.prometheus, self.alertmanager):
            if server is not None:
                server.stop()
        self.receiver.stop()

    def logs(self) -> str:
        parts = [f"--- {server.name} log ---\n{server.log()}"
                 for server in (self.prometheus, self.alertmanager) if server is not None]
        return "\n".join(parts)

    def __enter__(self) -> PromStack:
        try:
            return self.start()
        except BaseException:
            print(self.logs())
            self.stop()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            print(self.logs())
        self.stop()

    def wait_for_alert(self, name: str, labels: Mapping[str, str] | None = None, receiver: str | None = None,
                       timeout: float = 30.0) -> ReceivedAlert:
        """The first firing alert ``name`` that reached the webhook receiver with all of ``labels``
        (and, if given, through the Alertmanager receiver named ``receiver``). Raises
        AssertionError with what did arrive, and what Prometheus holds, after ``timeout`` s."""
        wanted = dict(labels or {})
        deadline = time.monotonic() + timeout
        while True:
            for alert in self.receiver.alerts():
                if (alert.status == "firing" and alert.labels.get("alertname") == name
                        and wanted.items() <= alert.labels.items()
                        and (receiver is None or alert.receiver == receiver)):
                    return alert
            if time.monotonic() > deadline:
                raise AssertionError(self._not_arrived(name, wanted, receiver, timeout))
            time.sleep(0.2)

    def _not_arrived(self, name: str, labels: Mapping[str, str], receiver: str | None, timeout: float) -> str:
        seen = [f"  {a.receiver} ({a.path}) {a.status} {a.labels}" for a in self.receiver.alerts()]
        try:
            assert self.prometheus is not None
            held = [f"  {a['state']} {a['labels']}" for a in self.prometheus.get("/api/v1/alerts")["data"]["alerts"]]
            scraped = [f"  {t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t['lastError']}"
                       for t in self.prometheus.get("/api/v1/targets")["data"]["activeTargets"]]
        except (AssertionError, urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            held, scraped = [f"  (could not ask Prometheus: {exc!r})"], []
        return (f"alert {name} {dict(labels)} did not reach receiver {receiver or '(any)'} in {timeout} s.\n"
                "Received:\n" + ("\n".join(seen) or "  nothing") + "\n"
                "Prometheus' alerts:\n" + ("\n".join(held) or "  none") + "\n"
                "Prometheus' targets:\n" + ("\n".join(scraped) or "  none"))


@pytest.fixture
def prom_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., PromStack]]:
    """Starts a :class:`PromStack` on demand: ``prom_stack(targets={"job": ["127.0.0.1:port"]})``.
    Everything started is stopped after the test; the servers' logs are printed if it failed."""
    stacks: list[PromStack] = []
    failed_before = request.session.testsfailed

    def start(targets: Mapping[str, Sequence[str]] | None = None) -> PromStack:
        stack = PromStack(tmp_path / f"promstack-{len(stacks)}", dict(targets or {}))
        stacks.append(stack)
        return stack.start()

    yield start
    failed = request.session.testsfailed > failed_before
    for stack in stacks:
        if failed:
            print(stack.logs())
        stack.stop()
