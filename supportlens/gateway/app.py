"""The gateway's HTTP application, built from injected collaborators so tests can construct it.

Handlers only read the request, call the pure functions of :mod:`~supportlens.gateway.ingest`
and hand records to a :class:`~supportlens.gateway.producer.RecordSink`. Every answer is
JSON (OTLP protobuf requests get protobuf successes); every error is
``{"error": "<what is wrong>"}``; an error of ours is logged with a correlation id and
answered ``500 {"error": "internal error", "id": …}``, never with a traceback. With a keys
file, every endpoint but ``/healthz`` and ``/metrics`` first asks
:class:`~supportlens.gateway.access.AccessControl` (401, 429), before the body is read.
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

from supportlens.metrics import Metrics, metrics_route, process_metrics
from supportlens.config import Settings
from supportlens.gateway import ingest, otlp_wire
from supportlens.gateway.access import KEY_HEADER, UNKNOWN_APP, AccessControl, Refused
from supportlens.gateway.addresses import ClientAddressPolicy
from supportlens.gateway.ingest import RequestRejected, too_large
from supportlens.gateway.producer import RecordSink, StorageUnavailable
from supportlens.gateway.receipts import ReportReceipts
from supportlens.gateway.status import ReportBook, diagnosis_view
from supportlens.otlp import RequestIdRule

log = logging.getLogger(__name__)

CONSENT_HEADER = "X-Supportlens-Consent"
RETRY_AFTER_S = 5
OPEN_PATHS = frozenset({"/healthz", "/metrics"})  # load balancers and Prometheus hold no key
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
    changes_stored: int = 0
    internal_errors: int = 0
    refused_unauthenticated: int = 0  # no API key, or one of no app
    refused_rate_limited: int = 0  # an app over its rate
    unconfirmed: int = 0  # answered 503: Kafka did not confirm the records in time


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
        self._receipts = ReportReceipts()
        self._policy = ClientAddressPolicy.from_settings(settings)
        self._rule = RequestIdRule(settings.request_id_attributes, settings.request_id_from_trace_id)
        self._status_base = f"{public_base_url(settings)}/v1/reports/"
        self.counters = Counters()

    async def traces(self, request: web.Request) -> web.Response:
        """``POST /v1/traces``: OTLP/HTTP, protobuf or JSON, answered in kind."""
        encoding = otlp_wire.encoding_of(request.content_type)
        payload = otlp_wire.decode_export_request(await self._body(request), encoding)
        batch = ingest.accept_spans(payload, self._rule, self._client_ip(request), self._policy,
                                    self._settings.max_record_bytes)
        await self._sink.send_all(ingest.span_records(batch.spans, self._settings.partitions,
                                                      self._settings.max_record_bytes))
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
            first_receipt=self._receipts.first,
        )
        await self._sink.send_all(accepted.records(self._settings.partitions, self._settings.max_record_bytes))
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

    async def changes(self, request: web.Request) -> web.Response:
        """``POST /v1/changes``: deploys, config changes, feature flags, infrastructure changes
        (one object or an array); 202 once Kafka stored them all."""
        require_json(request)
        changes = ingest.decode_changes(await self._body(request), self._settings.max_record_bytes, self._clock_us())
        await self._sink.send_all(ingest.change_records(changes))
        self.counters.changes_stored += len(changes)
        return json_response(202, {"accepted": len(changes), "change_ids": [c.change_id for c in changes]})

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


def json_errors(
    limit: int, counters: Counters, metrics: Metrics
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: every failure becomes ``{"error": …}``; ours are logged, never shown."""
    unconfirmed = metrics.gateway_unconfirmed

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestRejected as exc:
            return error_response(exc.status, exc.message)
        except StorageUnavailable as exc:
            counters.unconfirmed += 1
            # match_info.route.resource: the endpoint's pattern, not the path (a report id is no label)
            resource = request.match_info.route.resource
            unconfirmed.labels(resource.canonical if resource is not None else "?").inc()
            log.warning("%s %s: %s", request.method, request.path, exc)
            # "not confirmed", not "not stored": a stalled broker may still append it; a retry with
            # the same ids is then the same record (see receipts)
            response = error_response(
                503, f"Kafka did not confirm the data as stored: {exc}; retry later with the same ids"
            )
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


def access_checks(
    access: AccessControl, counters: Counters, metrics: Metrics
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: a request without a valid key is answered 401, one over its app's rate 429,
    before anything reads its body. Neither the key nor anything derived from it is logged."""
    refused = metrics.gateway_requests_refused
    refused.labels(UNKNOWN_APP, "unauthenticated")  # every series from zero, so rate() sees the first refusal
    for client_app in access.apps or ():
        refused.labels(client_app.name, "rate_limited")
    held_back: dict[str, int] = {}  # app → requests refused since it went over its rate (bounded: one per app)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        decision = access.check(request.headers.get("Authorization"), request.headers.get(KEY_HEADER))
        if not isinstance(decision, Refused):
            if decision.app in held_back:
                log.info("app %s is under its rate limit again; %d requests were refused with 429",
                         decision.app, held_back.pop(decision.app))
            return await handler(request)
        refused.labels(decision.app, decision.reason).inc()
        response = error_response(decision.status, decision.message)
        if decision.reason == "rate_limited":
            counters.refused_rate_limited += 1
            if decision.app not in held_back:
                log.info("%s; its requests are answered 429 until it is under its limit again", decision.message)
            held_back[decision.app] = held_back.get(decision.app, 0) + 1
            response.headers["Retry-After"] = str(decision.retry_after_s)
        else:
            counters.refused_unauthenticated += 1
            log.debug("refused %s %s from %s: %s", request.method, request.path[:_SHOWN_PATH], request.remote,
                      decision.message)
            response.headers["WWW-Authenticate"] = 'Bearer realm="supportlens"'
        return response

    return middleware


GATEWAY = web.AppKey("gateway", Gateway)


def build_app(
    settings: Settings,
    sink: RecordSink,
    book: ReportBook,
    clock_us: Callable[[], int] = now_us,
    new_report_id: Callable[[], str] = random_report_id,
    access: AccessControl | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The application around ``sink`` (where records go) and ``book`` (what reports became).

    ``access`` decides who may send; by default it is read from the settings (open without
    ``gateway_api_keys_file``). Raises :class:`~supportlens.errors.UserError` when
    ``trusted_proxies`` holds something that is not a network or the keys file is bad.
    Serve it with :func:`supportlens.gateway.server.open_site`, which leaves request bodies
    compressed for :func:`ingest.decompress_body` to bound.
    """
    if access is None:
        access = AccessControl.from_settings(settings)
    gateway = Gateway(settings, sink, book, clock_us, new_report_id)
    metrics = metrics or process_metrics()
    middlewares = [json_errors(settings.max_record_bytes, gateway.counters, metrics)]
    if not access.open:
        middlewares.append(access_checks(access, gateway.counters, metrics))
    app = web.Application(client_max_size=settings.max_record_bytes, middlewares=middlewares)
    app[GATEWAY] = gateway
    app.add_routes(
        [
            web.post("/v1/traces", gateway.traces),
            web.post("/v1/reports", gateway.report),
            web.get("/v1/reports/{report_id}", gateway.report_status),
            web.post("/v1/behaviour", gateway.behaviour),
            web.post("/v1/changes", gateway.changes),
            web.get("/healthz", gateway.health),
            metrics_route(),
        ]
    )
    return app
