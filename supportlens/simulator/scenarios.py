"""Scripted scenarios: what goes wrong, for whom, when, and what the pipeline should conclude."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from supportlens.simulator.world import BAD_RELEASE, Operation, User, World

# Diagnosis classes (DESIGN.md §4).
OK = "ok"
NETWORK_UNREACHABLE = "network_unreachable"
NETWORK_SLOW = "network_slow"
SERVER_ERROR = "server_error"
SERVER_SLOW = "server_slow"
CLIENT_MISUSE = "client_misuse"
CLIENT_CRASH = "client_crash"
CLASSES = (OK, NETWORK_UNREACHABLE, NETWORK_SLOW, SERVER_ERROR, SERVER_SLOW, CLIENT_MISUSE, CLIENT_CRASH)

# Background noise: share of all requests that fail this way outside any scenario.
NOISE: dict[str, float] = {
    NETWORK_UNREACHABLE: 0.002,
    NETWORK_SLOW: 0.004,
    SERVER_ERROR: 0.002,
    SERVER_SLOW: 0.004,
    CLIENT_MISUSE: 0.004,
    CLIENT_CRASH: 0.001,
}


@dataclass(frozen=True)
class Fault:
    """What a scenario does to one request: its class and where it happens."""

    cls: str
    service: str = ""  # the failing or slow service, for server-side classes
    code: str = ""  # the error code, for misuse


Effect = Callable[[User, Operation, World], "Fault | None"]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    effect: Effect | None = None
    probability: float = 0.0  # chance an exposed request is hit while the fault is active
    window: tuple[float, float] = (0.2, 0.7)  # active part of the run, as fractions of its duration
    expects_incident: bool = False
    expected_class: str = OK
    dimension: dict[str, str] = field(default_factory=dict)
    start_hour_utc: int | None = None  # forces the start time of day (quiet night)
    # Extra traffic while the fault is active, as a share of the run's rate, from the
    # users ``burst_users`` selects, all calling ``burst_operation`` (an integration gone wild).
    burst_share: float = 0.0
    burst_operation: str = ""
    burst_users: Callable[[User, World], bool] | None = None


def _service_outage(user: User, op: Operation, world: World) -> Fault | None:
    return Fault(SERVER_ERROR, service="payment") if "payment" in op.services() else None


def _isp_outage(user: User, op: Operation, world: World) -> Fault | None:
    return Fault(NETWORK_UNREACHABLE) if user.region.name == "cn-east" and user.isp.name == "China Telecom" else None


def _bad_release(user: User, op: Operation, world: World) -> Fault | None:
    return Fault(CLIENT_CRASH) if user.app_version == BAD_RELEASE and op.screen == "checkout" else None


def _misuse_account(user: User, world: World) -> bool:
    return user.account_id == world.misuse_account


def _misuse_wave(user: User, op: Operation, world: World) -> Fault | None:
    if _misuse_account(user, world) and op.name == "POST /v1/orders":
        return Fault(CLIENT_MISUSE, service="auth", code="ORDER_BEFORE_LOGIN")
    return None


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("normal", "an ordinary stretch of traffic with background noise only"),
        Scenario(
            "service-outage",
            "the payment service fails most calls (503) for half of the run",
            effect=_service_outage,
            probability=0.9,
            expects_incident=True,
            expected_class=SERVER_ERROR,
            dimension={"service": "payment"},
        ),
        Scenario(
            "isp-outage",
            "China Telecom users in cn-east cannot reach us for half of the run",
            effect=_isp_outage,
            probability=0.95,
            expects_incident=True,
            expected_class=NETWORK_UNREACHABLE,
            dimension={"region": "cn-east", "network": "China Telecom"},
        ),
        Scenario(
            "bad-release",
            f"Android app {BAD_RELEASE} crashes on checkout after its release, until it is rolled back",
            effect=_bad_release,
            probability=0.8,
            window=(0.2, 0.8),
            expects_incident=True,
            expected_class=CLIENT_CRASH,
            dimension={"app_version": BAD_RELEASE, "platform": "android"},
        ),
        Scenario(
            "misuse-wave",
            "one VIP customer's integration places orders before logging in",
            effect=_misuse_wave,
            probability=0.9,
            window=(0.1, 0.9),
            burst_share=0.03,
            burst_operation="POST /v1/orders",
            burst_users=_misuse_account,
            expected_class=CLIENT_MISUSE,  # no incident: the customer gets advice (see RunLabel.misuse_account)
        ),
        Scenario(
            "quiet-night",
            "04:00 in Asia, evening in Europe: three of five regions nearly idle, a few unrelated failures",
            start_hour_utc=20,
        ),
    )
}


def scenario(name: str) -> Scenario:
    """Look a scenario up by name; ``KeyError`` lists the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
