"""The gateway's HTTP application, built from injected collaborators so tests can construct it.

Handlers only read the request, call the pure functions of :mod:`~supportlens.gateway.ingest`
and hand records to a :class:`~supportlens.gateway.producer.RecordSink`. Every answer is
JSON (OTLP protobuf requests get protobuf successes); every error is
``{"error": "<what is wrong>"}``; an error of ours is logged with a correlation id and
answered ``500 {"error": "internal error", "id": …}``, never with a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import msgspec
from aiohttp import web

from supportlens.metrics import metrics_route
from supportlens.config import Settings
from supportlens.gateway import ingest, otlp_wire
from supportlens.gateway.addresses import ClientAddressPolicy
from supportlens.gateway.ingest import RequestRejected, too_large
from supportlens.gateway.producer import RecordSink, StorageUnavailable
from supportlens.gateway.status import ReportBook, diagnosis_view
from supportlens.otlp import RequestIdRule

log = logging.getLogger(__name__)

CONSENT_HEADER = "X-Supportlens-Consent"
RETRY_AFTER_S = 5
_JSON = "application/json"
_SHOWN_PATH = 200  # an echoed path is cut here: the client wrote it


@dataclass
class Counters:
    """What the gateway did since it started; logged at shutdown."""

    spans_stored: int = 0
    spans_rejected: int = 0
    spans_withheld: int = 0  # client spans of users who did not consent to tracing
    reports_accepted: int = 0
    behaviour_stored: int = 0
    behaviour_withheld: int = 0  # events sent without the consent header
    internal_errors: int = 0


def now_us() -> int:
    return time.time_ns() // 1000


def random_report_id() -> str:
    return str(uuid.uuid4())


def public_base_url(settings: Settings) -> str:
    """Where clients reach the gateway: ``gateway_public_url``, else ``http://host:port``."""
    if settings.gateway_public_url:
        return settings.gateway_public_url.rstrip("/")
    host = settings.gateway_host
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{settings.gateway_port}"


def json_response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(body), content_type=_JSON)


def error_response(status: int, message: str) -> web.Response:
    return json_response(status, {"error": message})


def require_json(request: web.Request) -> None:
    if request.content_type != _JSON:
        raise RequestRejected(415, f"Content-Type must be {_JSON}, got {request.content_type!r}")


class Gateway:
    """The endpoints; one instance per application."""

    def __init__(
        self,
        settings: Settings,
        sink: RecordSink,
        book: ReportBook,
        clock_us: Callable[[], int] = now_us,
        new_report_id: Callable[[], str] = random_report_id,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._book = book
        self._clock_us = clock_us
        self._new_report_id = new_report_id
        self._policy = ClientAddressPolicy.from_settings(settings)
        self._rule = RequestIdRule(settings.request_id_attributes, settings.request_id_from_trace_id)
        self._status_base = f"{public_base_url(settings)}/v1/reports/"
        self.counters = Counters()

    async def traces(self, request: web.Request) -> web.Response:
        """``POST /v1/traces``: OTLP/HTTP, protobuf or JSON, answered in kind."""
        encoding = otlp_wire.encoding_of(request.content_type)
        payload = otlp_wire.decode_export_request(await self._body(request), encoding)
        batch = ingest.accept_spans(payload, self._rule, self._client_ip(request), self._policy)
        await self._sink.send_all(ingest.span_records(batch.spans))
        self.counters.spans_stored += len(batch.spans)
        self.counters.spans_rejected += batch.rejected
        self.counters.spans_withheld += batch.withheld
        body = otlp_wire.export_response(encoding, batch.refused, batch.message())
        return web.Response(status=200, body=body, content_type=encoding.value)

    async def report(self, request: web.Request) -> web.Response:
        """``POST /v1/reports``: a one-click fault report; 202 with where to ask for its diagnosis."""
        require_json(request)
        accepted = ingest.accept_fault_report(
            await self._body(request),
            received_at_us=self._clock_us(),
            client_ip=self._client_ip(request),
            new_report_id=self._new_report_id,
            policy=self._policy,
            max_bytes=self._settings.max_record_bytes,
        )
        await self._sink.send_all(accepted.records())
        report_id = accepted.report.report_id
        self._book.accepted(report_id)
        self.counters.reports_accepted += 1
        return json_response(202, {"report_id": report_id, "status_url": self._status_base + quote(report_id, safe="")})

    async def report_status(self, request: web.Request) -> web.Response:
        """``GET /v1/reports/{id}``: 200 diagnosed, 202 pending, 404 unknown."""
        report_id = request.match_info["report_id"]
        found = self._book.lookup(report_id)
        if found is None:
            return error_response(404, f"unknown report id {report_id[:128]!r}")
        if found == "pending":
            return json_response(202, {"report_id": report_id, "status": "pending"})
        return json_response(200, diagnosis_view(found))

    async def behaviour(self, request: web.Request) -> web.Response:
        """``POST /v1/behaviour``: events stored only with the ``X-Supportlens-Consent: granted`` header."""
        require_json(request)
        events = ingest.decode_behaviour(await self._body(request), self._settings.max_record_bytes)
        if not ingest.consented(request.headers.get(CONSENT_HEADER)):
            self.counters.behaviour_withheld += len(events)
            return json_response(202, {"accepted": 0, "dropped_without_consent": len(events)})
        await self._sink.send_all(ingest.behaviour_records(events))
        self.counters.behaviour_stored += len(events)
        return json_response(202, {"accepted": len(events), "dropped_without_consent": 0})

    async def health(self, _request: web.Request) -> web.Response:
        """``GET /healthz``: 200 while Kafka answers (checked at most every few seconds)."""
        if await self._sink.reachable():
            return json_response(200, {"status": "ok"})
        return error_response(503, "Kafka does not answer")

    async def _body(self, request: web.Request) -> bytes:
        limit = self._settings.max_record_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        body = await request.read()  # aiohttp stops at client_max_size (= limit) while reading
        return ingest.decompress_body(body, request.headers.get("Content-Encoding", ""), limit)

    def _client_ip(self, request: web.Request) -> str:
        return self._policy.client_ip(request.remote, request.headers.getall("X-Forwarded-For", []))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_errors(limit: int, counters: Counters) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: every failure becomes ``{"error": …}``; ours are logged, never shown."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestRejected as exc:
            return error_response(exc.status, exc.message)
        except StorageUnavailable as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            response = error_response(503, f"could not store the data: {exc}; retry later")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, too_large(limit).message)
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            response = error_response(
                405, f"method {request.method} is not allowed on {request.path[:_SHOWN_PATH]}; use {allowed}"
            )
            response.headers["Allow"] = allowed
            return response
        except web.HTTPNotFound:
            return error_response(404, f"no endpoint at {request.path[:_SHOWN_PATH]}")
        except web.HTTPException as exc:  # any other answer aiohttp raises on its own
            return error_response(exc.status, exc.reason.lower())
        except Exception:
            error_id = uuid.uuid4().hex[:16]
            counters.internal_errors += 1
            log.exception("internal error %s on %s %s from %s", error_id, request.method, request.path, request.remote)
            return json_response(500, {"error": "internal error", "id": error_id})

    return middleware


GATEWAY = web.AppKey("gateway", Gateway)


def build_app(
    settings: Settings,
    sink: RecordSink,
    book: ReportBook,
    clock_us: Callable[[], int] = now_us,
    new_report_id: Callable[[], str] = random_report_id,
) -> web.Application:
    """The application around ``sink`` (where records go) and ``book`` (what reports became).

    Raises :class:`~supportlens.errors.UserError` when ``trusted_proxies`` holds something
    that is not a network. Serve it with :func:`supportlens.gateway.server.open_site`,
    which leaves request bodies compressed for :func:`ingest.decompress_body` to bound.
    """
    gateway = Gateway(settings, sink, book, clock_us, new_report_id)
    app = web.Application(
        client_max_size=settings.max_record_bytes,
        middlewares=[json_errors(settings.max_record_bytes, gateway.counters)],
    )
    app[GATEWAY] = gateway
    app.add_routes(
        [
            web.post("/v1/traces", gateway.traces),
            web.post("/v1/reports", gateway.report),
            web.get("/v1/reports/{report_id}", gateway.report_status),
            web.post("/v1/behaviour", gateway.behaviour),
            web.get("/healthz", gateway.health),
            metrics_route(),
        ]
    )
    return app
