"""The support lookup API (HTTP, JSON): the lookups of :mod:`supportlens.store.lookup` over the web.

Endpoints (all GET): ``/v1/timeline?ip=|user=|account=&since=24h&until=now&limit=200``,
``/v1/request?id=``, ``/v1/report?id=``, ``/v1/top?by=service&since=7d``, ``/v1/tables``,
``/v1/changes?since=24h&service=``, ``/v1/paths?since=7d&steps=3``, ``/v1/funnels?since=7d&by=app_version&funnel=``,
``/healthz`` and ``/metrics``; for drills ``/v1/incident?id=`` and the recorded records of a
window, a page at a time: ``/v1/recorded/spans`` and ``/v1/recorded/reports``
(``since_us``, ``until_us``, ``after`` = the previous page's ``next``, ``limit``). A bad input
is a ``400`` with ``{"error", "hint"}`` in the user's words; nothing else about the query or
the store is revealed. Queries are blocking calls into ClickHouse, so they run in threads and
the event loop stays free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from supportlens.metrics import metrics_route
from supportlens.errors import UserError
from supportlens.store.lookup import LookupInputError, parse_duration, parse_until
from supportlens.support.access import Support

log = logging.getLogger(__name__)

SUPPORT: web.AppKey[Support] = web.AppKey("support", object)  # type: ignore[arg-type]
_encoder = msgspec.json.Encoder()
MAX_FUNNELS_TEXT = 6_000  # a --file of one's own travels in the query string (aiohttp's line limit is 8 KB)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


def _int(query: Any, name: str, default: int | None = None) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LookupInputError(f"`{name}` must be a whole number, got {raw[:40]!r}") from None


def _window(query: Any, default_since: str) -> tuple[int, int]:
    until = _int(query, "until_us")
    if until is None:
        until = parse_until(query.get("until"))
    since = _int(query, "since_us")
    if since is None:
        since = until - parse_duration(query.get("since", default_since)) * 1_000_000
    return since, until


def _limit(query: Any, default: int) -> int:
    value = _int(query, "limit", default)
    assert value is not None
    return value


async def _run(request: web.Request, call: Callable[[Support], Any]) -> web.Response:
    support = request.app[SUPPORT]
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, call, support)
    except UserError as exc:
        return _json({"error": exc.message, "hint": exc.hint or ""}, status=400)
    except Exception:  # noqa: BLE001 - ours, not the caller's: logged with context, answered plainly
        log.exception("support API: %s failed", request.path_qs[:300])
        return _json({"error": "the lookup failed on our side; it has been logged"}, status=500)
    return _json(result)


async def timeline(request: web.Request) -> web.Response:
    query = request.query
    given = [kind for kind in ("ip", "user", "account") if kind in query]

    def call(support: Support) -> Any:
        if len(given) != 1:
            raise LookupInputError("give exactly one of ip, user or account")
        since, until = _window(query, "24h")
        return support.timeline(given[0], query[given[0]], since, until, _limit(query, 200))

    return await _run(request, call)


async def request_chain(request: web.Request) -> web.Response:
    return await _run(request, lambda support: support.request_chain(request.query.get("id", "")))


async def report_detail(request: web.Request) -> web.Response:
    return await _run(request, lambda support: support.report_detail(request.query.get("id", "")))


async def top(request: web.Request) -> web.Response:
    query = request.query

    def call(support: Support) -> Any:
        since, until = _window(query, "7d")
        return support.top_problems(query.get("by", "service"), since, until, _limit(query, 20))

    return await _run(request, call)


async def tables(request: web.Request) -> web.Response:
    return await _run(request, lambda support: support.table_counts())


async def incident(request: web.Request) -> web.Response:
    return await _run(request, lambda support: support.recorded_incident(request.query.get("id", "")))


def _recorded_page(kind: str, default_limit: int) -> Callable[[web.Request], Any]:
    async def page(request: web.Request) -> web.Response:
        query = request.query

        def call(support: Support) -> Any:
            since, until = _int(query, "since_us"), _int(query, "until_us")
            if since is None or until is None:
                raise LookupInputError("give the window as since_us and until_us (UTC microseconds)")
            after, limit = query.get("after", ""), _limit(query, default_limit)
            if len(after) > 2048:
                raise LookupInputError("`after` is not a position this API gave out")
            if kind == "spans":
                return support.recorded_spans(since, until, after, limit)
            return support.recorded_reports(since, until, after, limit)

        return await _run(request, call)

    return page


async def daily_report(request: web.Request) -> web.Response:
    return await _run(request, lambda support: support.daily_figures(request.query.get("day", "")))


async def perception_report(request: web.Request) -> web.Response:
    query = request.query
    return await _run(request, lambda support: support.perception_figures(query.get("period", "week"),
                                                                            query.get("day", "")))


async def account_report(request: web.Request) -> web.Response:
    query = request.query
    return await _run(request, lambda support: support.account_figures(
        query.get("account", ""), query.get("period", "week"), query.get("day", "")))


async def recent_changes(request: web.Request) -> web.Response:
    query = request.query

    def call(support: Support) -> Any:
        since, until = _window(query, "24h")
        return support.recent_changes(since, until, query.get("service", ""), _limit(query, 200))

    return await _run(request, call)


async def funnel_report(request: web.Request) -> web.Response:
    query = request.query

    def call(support: Support) -> Any:
        from supportlens.store.funnels import FUNNELS_PATH

        since, until = _window(query, "7d")
        text = query.get("funnels") or FUNNELS_PATH.read_text(encoding="utf-8")
        if len(text) > MAX_FUNNELS_TEXT:
            raise LookupInputError(f"the funnels file is {len(text):,} characters, over {MAX_FUNNELS_TEXT:,}")
        return support.funnel_report(text, query.get("funnel", ""), since, until, query.get("by", "app_version"))

    return await _run(request, call)


async def common_paths(request: web.Request) -> web.Response:
    query = request.query

    def call(support: Support) -> Any:
        since, until = _window(query, "7d")
        return support.common_paths(since, until, _int(query, "steps", 3) or 3)

    return await _run(request, call)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def build_support_app(support: Support, registry: CollectorRegistry) -> web.Application:
    app = web.Application()
    app[SUPPORT] = support

    app.router.add_get("/v1/timeline", timeline)
    app.router.add_get("/v1/request", request_chain)
    app.router.add_get("/v1/report", report_detail)
    app.router.add_get("/v1/top", top)
    app.router.add_get("/v1/tables", tables)
    app.router.add_get("/v1/incident", incident)
    app.router.add_get("/v1/recorded/spans", _recorded_page("spans", 5000))
    app.router.add_get("/v1/recorded/reports", _recorded_page("reports", 200))
    app.router.add_get("/v1/reports/daily", daily_report)
    app.router.add_get("/v1/reports/perception", perception_report)
    app.router.add_get("/v1/reports/account", account_report)
    app.router.add_get("/v1/changes", recent_changes)
    app.router.add_get("/v1/paths", common_paths)
    app.router.add_get("/v1/funnels", funnel_report)
    app.router.add_get("/healthz", healthz)
    app.router.add_routes([metrics_route(registry)])
    return app
