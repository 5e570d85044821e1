"""A real webhook endpoint, standing in for a customer's (the demo's, and the tests'): aiohttp on
127.0.0.1 in a thread of its own.

Each path answers the statuses of its plan in order, repeating the last (200 without a
plan); a request whose signature does not verify against the receiver's secret gets 401.
Every request is kept with whether its signature verified.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sinks.signing import verify_signature


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = _free_port()
        self._received: list[Received] = []
        self.plans: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"webhook-{self.port}", daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, path: str, *statuses: int) -> None:
        with self._lock:
            self.plans[path] = list(statuses)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify_signature(self.secret, request.headers.get("X-Supportlens-Signature", ""), body, now=time.time())
        with self._lock:
            self._received.append(Received(request.path, dict(request.headers), body, ok))
            plan = self.plans.get(request.path, [200])
            status = plan.pop(0) if len(plan) > 1 else plan[0]
        return web.Response(status=status if ok else 401, text="thanks" if status < 300 else "not now")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
