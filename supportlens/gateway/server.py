"""``supportlens gateway``: serve until SIGINT or SIGTERM, then stop listening, finish, flush, exit."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from supportlens.config import Settings
from supportlens.errors import UserError
from supportlens.gateway.access import AccessControl
from supportlens.gateway.app import GATEWAY, Counters, build_app, public_base_url
from supportlens.gateway.ingest import BEHAVIOUR, CHANGES, CLIENT_SPANS, FAULT_REPORTS, SERVER_SPANS
from supportlens.gateway.producer import KafkaRecordSink
from supportlens.gateway.status import DIAGNOSED_TOPIC, DiagnosedReportFollower, ReportBook
from supportlens.log_floods import quiet_repeats
from supportlens.topics import require_topics

log = logging.getLogger(__name__)

TOPICS_USED = (CLIENT_SPANS, SERVER_SPANS, FAULT_REPORTS, BEHAVIOUR, CHANGES, DIAGNOSED_TOPIC)


async def open_site(app: web.Application, host: str, port: int, *, name: str = "gateway",
                    env_prefix: str = "SUPPORTLENS_GATEWAY") -> web.AppRunner:
    """Listen on ``host:port``. Bodies reach the handlers as sent: the gateway inflates
    compressed ones itself, with a bound (aiohttp's own inflating would not be bounded
    the same way on every version)."""
    runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise UserError(
            f"the {name} cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint=f"choose another address with {env_prefix}_HOST / {env_prefix}_PORT",
        ) from None
    return runner


async def serve(settings: Settings, stop: asyncio.Event) -> Counters:
    """Serve until ``stop`` is set; then stop listening, let requests in flight finish and flush.

    Raises :class:`UserError` when the keys file is bad, Kafka does not answer, a topic is
    missing, a setting is wrong or the address is taken: all before anything was accepted.
    """
    access = AccessControl.from_settings(settings)  # a bad keys file is found before Kafka is asked
    require_topics(settings, TOPICS_USED)
    book = ReportBook()
    sink = KafkaRecordSink(settings)
    follower = DiagnosedReportFollower(settings, book.add_diagnoses)
    try:
        app = build_app(settings, sink, book, access=access)
        follower.start(asyncio.get_running_loop())
        sink.start()
        runner = await open_site(app, settings.gateway_host, settings.gateway_port)
        try:
            log.info("gateway listening at %s (Kafka %s)", public_base_url(settings), settings.kafka_bootstrap)
            _log_access(access, settings)
            await stop.wait()
            log.info("gateway stopping")
        finally:
            await runner.cleanup()
    finally:
        follower.stop()
        await sink.close()
    if follower.invalid:
        log.warning("%d records on %s could not be decoded", follower.invalid, settings.topic(DIAGNOSED_TOPIC))
    return app[GATEWAY].counters


def _log_access(access: AccessControl, settings: Settings) -> None:
    if access.apps is None:
        log.warning("no API keys file: the gateway accepts data from any client that reaches %s:%d, without a key "
                    "and without a rate limit; set gateway_api_keys_file (SUPPORTLENS_GATEWAY_API_KEYS_FILE) "
                    "before clients beyond this machine can reach it", settings.gateway_host, settings.gateway_port)
        return
    apps = "; ".join(f"{app.name} ({len(app.key_sha256)} key{'s' * (len(app.key_sha256) != 1)}, "
                     f"{app.limit.describe()})" for app in access.apps)
    log.info("API keys required, apps from %s: %s", settings.gateway_api_keys_file, apps)


def run_gateway(settings: Settings, loglevel: str = "info") -> None:
    """Serve until SIGINT or SIGTERM (see :func:`serve`); logs what was done on the way out."""
    logging.basicConfig(level=getattr(logging, loglevel.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # while Kafka is away every refused request would log a line: the 503s are counted in
    # supportlens_gateway_unconfirmed_total and in the line logged at shutdown
    quiet_repeats("supportlens.gateway.app")
    asyncio.run(_serve_until_signalled(settings))


async def _serve_until_signalled(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    counters = await serve(settings, stop)
    log.info("gateway stopped cleanly: %s", counters)
