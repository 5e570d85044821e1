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
class Rollout:
    """A gradual deploy of a new version of one service, announced as a ``deploy`` change.

    From the run time of each step (a fraction of the run) the new version serves that
    share of the service's requests, chosen per request. A request the new version serves
    fails on the service's hop with the scenario's ``probability``; the old version only
    sees background noise. The deploy starts at the first step and finishes at the last.
    """

    service: str
    from_version: str
    to_version: str
    steps: tuple[tuple[float, float], ...]  # (fraction of the run, share of the service's requests on the new version)
    change_id: str  # a prefix: the run's start (s) is appended, so two runs never replace each other's change
    author: str = ""
    link: str = ""
    description: str = ""


@dataclass(frozen=True)
class ScriptedChange:
    """A change on the ``changes`` topic that does not cause the scenario's failures (a distractor
    for suspect ranking): it started ``before_s`` seconds before the scenario's window."""

    change_id: str  # a prefix, as :attr:`Rollout.change_id`
    kind: str  # deploy | config | feature_flag | infra
    service: str
    before_s: int
    lasted_s: int
    version: str = ""
    author: str = ""
    description: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


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
    rollout: Rollout | None = None  # a deploy whose new version fails (the window starts at its first step)
    other_changes: tuple[ScriptedChange, ...] = ()  # changes that explain nothing


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


# bad-deploy: payment 1.4.1 → 1.4.2 at 30 %, 55 % and 80 % of the run (90 s, 165 s and 240 s
# of a 300-s run: 75 s at 10 % and 75 s at 50 % before everyone gets it).
PAYMENT_OLD = "1.4.1"
PAYMENT_NEW = "1.4.2"
BAD_DEPLOY_STEPS = ((0.30, 0.10), (0.55, 0.50), (0.80, 1.0))

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
        Scenario(
            "bad-deploy",
            f"payment {PAYMENT_NEW} rolls out 10 % → 50 % → 100 % and fails most calls it serves (503); "
            "an unrelated search config change 20 min earlier",
            probability=0.95,
            window=(BAD_DEPLOY_STEPS[0][0], 1.0),
            expects_incident=True,
            expected_class=SERVER_ERROR,
            dimension={"service": "payment"},
            rollout=Rollout(
                service="payment",
                from_version=PAYMENT_OLD,
                to_version=PAYMENT_NEW,
                steps=BAD_DEPLOY_STEPS,
                change_id=f"deploy-payment-{PAYMENT_NEW}",
                author="ci-pipeline",
                link="https://ci.example.com/payments/pipelines/1442",
                description=f"payment {PAYMENT_NEW}: new card tokenisation client (canary 10 % → 50 % → 100 %)",
            ),
            other_changes=(
                ScriptedChange(
                    change_id="config-search-ranking",
                    kind="config",
                    service="search",
                    before_s=20 * 60,
                    lasted_s=30,
                    author="discovery-oncall",
                    description="search: ranking.boost_recent 0.2 → 0.3",
                    attributes={"key": "ranking.boost_recent", "from": "0.2", "to": "0.3"},
                ),
            ),
        ),
    )
}


def scenario(name: str) -> Scenario:
    """Look a scenario up by name; ``KeyError`` lists the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
