"""The spans of one simulated request: its call chain of server spans and its client span.

Pure functions of the ``random.Random`` they are given, so the traffic (``generate``) and the
sequence-misuse episodes (``misuse``) shape requests alike while each draws from its own
generator: a draw here never moves another part's sequence of random numbers.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence

from supportlens.contracts import Span
from supportlens.simulator import scenarios as sc
from supportlens.simulator.world import SERVICES, Operation, User

CLIENT_SERVICE = "mobile-app"
MISUSE_CODES = (  # (code, http status, where it is refused)
    ("ORDER_BEFORE_LOGIN", 401, "auth"),
    ("RATE_LIMITED", 429, "edge-gateway"),
    ("INVALID_CURRENCY", 400, "payment"),
    ("IDEMPOTENCY_KEY_REUSED", 409, "orders"),
)
NETWORK_ERRORS = ("NETWORK_UNREACHABLE", "CONNECT_TIMEOUT", "DNS_FAILURE", "TLS_HANDSHAKE_TIMEOUT")


def hex_id(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def serving_version(rollout: sc.Rollout | None, steps_us: Sequence[tuple[int, float]], op: Operation, ts: int,
                    rng: random.Random) -> str:
    """The version of the rolled-out service that serves this request ("" without a rollout,
    or when the request does not call that service): new with the rollout's share at ``ts``.
    Draws only while the share is strictly between 0 and 1."""
    if rollout is None or rollout.service not in op.services():
        return ""
    share = 0.0
    for at, step_share in steps_us:
        if ts >= at:
            share = step_share
    new = share >= 1 or (share > 0 and rng.random() < share)
    return rollout.to_version if new else rollout.from_version


def request_spans(
    rng: random.Random, user: User, op: Operation, fault: sc.Fault, request_id: str, trace_id: str, ts: int,
    versioned: str = "", version: str = "", *, failure: tuple[int, str] | None = None,
    attributes: Mapping[str, str] | None = None,
) -> tuple[list[Span], Span, str]:
    """Server spans of the call chain, the client span and the failing service, shaped by the fault.

    ``versioned`` names the service whose span carries ``version`` as ``service.version`` (OTel).
    ``failure`` is the (HTTP status, error code) the failing hop of a server error answers
    instead of 503 ``<SERVICE>_UNAVAILABLE``. ``attributes`` are what the client sent with the
    request (an idempotency key, say): the client span and the root server span carry them.
    Without ``failure`` and ``attributes`` the draws are those the traffic always made."""
    extra = dict(attributes or {})
    rtt_ms = {"ethernet": 15, "wifi": 30, "cellular-5g": 40, "cellular-4g": 70}[user.connection_type]
    client_span_id = hex_id(rng, 64)
    common = dict(request_id=request_id, trace_id=trace_id)
    if fault.cls == sc.NETWORK_UNREACHABLE:
        code = rng.choice(NETWORK_ERRORS)
        duration_ms = rng.uniform(8_000, 30_000) if code.endswith("TIMEOUT") else rng.uniform(5, 300)
        client = client_span(user, op, common, client_span_id, ts, duration_ms, "error", None, code,
                             "the request could not be sent", extra)
        return [], client, ""

    chain = op.chain
    failing = ""
    cut = len(chain)  # hops at or after `cut` are never called
    slow_hop = -1
    status_of: dict[int, tuple[int, str]] = {}
    if fault.cls == sc.SERVER_ERROR:
        candidates = [i for i, (s, _) in enumerate(chain) if s == fault.service] or list(range(1, len(chain))) or [0]
        hop = candidates[0] if fault.service else rng.choice(candidates)
        failing = chain[hop][0]
        status_of[hop] = failure or (503, f"{failing.upper().replace('-', '_')}_UNAVAILABLE")
        for parent in ancestors(chain, hop):
            status_of[parent] = (502, "UPSTREAM_ERROR")
        cut = hop + 1
    elif fault.cls == sc.CLIENT_MISUSE:
        choices = [m for m in MISUSE_CODES if m[2] in op.services()]
        code, http, where = next((m for m in choices if m[0] == fault.code), None) or rng.choice(choices)
        hop = op.services().index(where)
        failing = where
        status_of[hop] = (http, code)
        for parent in ancestors(chain, hop):
            status_of[parent] = (http, code)
        cut = hop + 1
    elif fault.cls == sc.SERVER_SLOW:
        slow_hop = rng.randrange(len(chain))
        failing = chain[slow_hop][0]

    # own time per hop; a parent's duration covers its children, called one after another
    own = []
    for i, (service, _) in enumerate(chain[:cut]):
        spec = SERVICES[service]
        ms = rng.lognormvariate(math.log(spec.base_ms), 0.35)
        if i == slow_hop:
            ms = spec.objective_ms * rng.uniform(2.5, 6)
        own.append(ms * 1000)
    children: dict[int, list[int]] = defaultdict(list)
    for i, (_, parent) in enumerate(chain[:cut]):
        if parent >= 0:
            children[parent].append(i)
    durations = [0.0] * cut
    for i in reversed(range(cut)):
        durations[i] = own[i] + sum(durations[c] for c in children[i])
    span_ids = [hex_id(rng, 64) for _ in range(cut)]
    starts = [0.0] * cut
    starts[0] = ts + rtt_ms * 500  # half a round trip after the client sent it
    for i in range(cut):
        offset = starts[i] + own[i] * 0.3
        for c in children[i]:
            starts[c] = offset
            offset += durations[c]

    server = []
    for i, (service, parent) in enumerate(chain[:cut]):
        http, code = status_of.get(i, (201 if op.name.startswith("POST") else 200, ""))
        own_attributes = {"team": SERVICES[service].team}
        if service == versioned and version:
            own_attributes["service.version"] = version
        server.append(
            Span(
                **common,
                span_id=span_ids[i],
                parent_span_id=span_ids[parent] if parent >= 0 else client_span_id,
                side="server",
                service=service,
                operation=op.name if i == 0 else f"{service}.{op.screen}",
                start_us=int(starts[i]),
                duration_us=int(durations[i]),
                status="error" if http >= 500 else "ok",  # OTel: a 4xx is the caller's fault
                http_status=http,
                error_code=code,
                error_message="upstream connection refused" if http == 503 else "",
                user_id=user.user_id,
                account_id=user.account_id,
                app_version=user.app_version,
                platform=user.platform,
                region=user.region.name,
                attributes=own_attributes | extra if i == 0 else own_attributes,
            )
        )
    total_ms = durations[0] / 1000 + rtt_ms
    root_http, root_code = status_of.get(0, (server[0].http_status or 200, ""))
    if fault.cls == sc.NETWORK_SLOW:
        total_ms += rng.uniform(3_000, 12_000)
    if fault.cls == sc.CLIENT_CRASH:
        client = client_span(user, op, common, client_span_id, ts, total_ms + rng.uniform(5, 50), "error",
                             root_http, "APP_CRASH", "SIGSEGV in CheckoutViewModel.render at 0x7f3a2c (libapp.so)",
                             extra)
    else:
        client = client_span(user, op, common, client_span_id, ts, total_ms,
                             "error" if root_http >= 400 else "ok", root_http, root_code, "", extra)
    return server, client, failing


def client_span(user: User, op: Operation, common: dict[str, str], span_id: str, ts: int, duration_ms: float,
                status: str, http: int | None, code: str, message: str,
                attributes: Mapping[str, str] | None = None) -> Span:
    return Span(
        **common,
        span_id=span_id,
        side="client",
        service=CLIENT_SERVICE,
        operation=op.name,
        start_us=ts,
        duration_us=int(duration_ms * 1000),
        status=status,  # type: ignore[arg-type]
        http_status=http,
        error_code=code,
        error_message=message,
        client_ip=user.client_ip,
        user_id=user.user_id,
        account_id=user.account_id,
        app_version=user.app_version,
        platform=user.platform,
        region=user.region.name,
        network=user.network,
        attributes={"screen": op.screen, **(attributes or {})},
    )


def ancestors(chain: tuple[tuple[str, int], ...], hop: int) -> list[int]:
    out = []
    parent = chain[hop][1]
    while parent >= 0:
        out.append(parent)
        parent = chain[parent][1]
    return out
