"""Behaviour paths of consented users (issue #18): sessions that walk named funnels, with ground truth.

Each simulated second, consented users start sessions at ``SESSION_SHARE`` of the request rate
(same regions and time of day as the traffic). A session walks one funnel of :data:`FUNNEL_PATHS`
step by step — one behaviour event per step, ``name`` the step (the action), ``screen`` the
screen it happens on — and after each step goes on to the next with that step's chance, or
stops there for good (the user dropped). A session starts only when even its slowest walk
ends inside the run, so no drop is the run's end (a run shorter than a funnel's longest
session, a few minutes, has none on it). One step is stuck for one app version on one platform
(:data:`STUCK`): those users mostly never get past the step before it. A few consented users
withdraw their consent during the run (a ``consent_withdrawn`` event); from then on they emit
no behaviour at all. Users without consent never emit behaviour.

Every random draw here comes from a generator of its own, seeded from the run's seed: the
traffic (spans, reports, their ids) is the same with or without behaviour paths, and the same
as before they existed.
"""

from __future__ import annotations

import heapq
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

from supportlens.contracts import BehaviourEvent
from supportlens.simulator.labels import (
    BehaviourLabel, FunnelPathLabel, FunnelStepLabel, StuckStepLabel, WithdrawalLabel,
)
from supportlens.simulator.draws import poisson
from supportlens.simulator.world import User, World

SECOND_US = 1_000_000
SESSION_SHARE = 0.05  # sessions started per request at the run's rate
WITHDRAW_SHARE = 0.03  # consented users who withdraw consent during the run
WITHDRAWN = "consent_withdrawn"  # the behaviour event that withdraws consent


@dataclass(frozen=True)
class FunnelPath:
    """A funnel as users walk it: steps as (action, screen); ``go_on[i]`` is the chance a user at
    step ``i`` reaches step ``i + 1``; a step follows the one before after ``gap_s`` seconds."""

    name: str
    weight: float  # share of sessions that walk this funnel
    steps: tuple[tuple[str, str], ...]
    go_on: tuple[float, ...]
    gap_s: tuple[int, int]

    def longest_us(self) -> int:
        """The longest a session on it can take, first step to last."""
        return (len(self.steps) - 1) * (self.gap_s[1] + 1) * SECOND_US


@dataclass(frozen=True)
class Stuck:
    """Users of ``app_version`` on ``platform`` mostly never reach ``step`` of ``funnel``:
    of those at the step before, only ``go_on`` get there."""

    funnel: str
    step: str
    app_version: str
    platform: str
    go_on: float


FUNNEL_PATHS: tuple[FunnelPath, ...] = (
    FunnelPath("checkout", 0.6,
               (("view_cart", "cart"), ("start_checkout", "checkout"), ("enter_payment", "payment"),
                ("order_confirmed", "confirmation")),
               (0.70, 0.88, 0.85), (3, 30)),
    FunnelPath("onboarding", 0.4,
               (("sign_up", "sign_up"), ("verify_email", "verify_email"), ("create_api_key", "api_keys"),
                ("first_api_call", "console")),
               (0.65, 0.85, 0.80), (10, 60)),
)
STUCK = Stuck(funnel="checkout", step="enter_payment", app_version="5.3.1", platform="android", go_on=0.10)


def _drop_step(path: FunnelPath, go_on: tuple[float, ...]) -> str:
    """The step most users who enter never reach (the largest expected loss from the step before)."""
    reached, losses = 1.0, []
    for share in go_on:
        losses.append(reached * (1 - share))
        reached *= share
    return path.steps[1 + losses.index(max(losses))][0]


class BehaviourPaths:
    """The behaviour events of one run, released second by second (:meth:`due`)."""

    def __init__(self, seed: int, scenario: str, start_us: int, duration_s: int, world: World) -> None:
        self.rng = random.Random(f"behaviour:{seed}:{scenario}")
        self.end_us = start_us + duration_s * SECOND_US
        self.consented: dict[str, list[User]] = defaultdict(list)
        for user in world.users:
            if user.consented:
                self.consented[user.region.name].append(user)
        # who withdraws consent, and when (between 10 % and 90 % of the run)
        self.withdrawn_at: dict[str, int] = {}
        self.pending: list[tuple[int, int, BehaviourEvent]] = []
        self._seq = 0
        for user in (u for users in self.consented.values() for u in users):
            if self.rng.random() < WITHDRAW_SHARE:
                at = start_us + int(duration_s * self.rng.uniform(0.1, 0.9) * SECOND_US)
                self.withdrawn_at[user.user_id] = at
                self._push(self._event(user, at, WITHDRAWN, "settings"))
        self.sessions: Counter[str] = Counter()

    # ---- generation ----------------------------------------------------------------
    def allows(self, user_id: str, ts_us: int) -> bool:
        """Whether the user (consented) still consents at ``ts_us``."""
        at = self.withdrawn_at.get(user_id)
        return at is None or ts_us < at

    def start_sessions(self, t0_us: int, rates: dict[str, float]) -> None:
        """Start this second's sessions: ``rates`` is requests per second per region."""
        for region, rate in rates.items():
            users = self.consented.get(region)
            if not users:
                continue
            for _ in range(poisson(self.rng, rate * SESSION_SHARE)):
                user = self.rng.choice(users)
                self._session(user, t0_us + self.rng.randrange(SECOND_US))

    def _session(self, user: User, ts: int) -> None:
        if not self.allows(user.user_id, ts):
            return  # withdrawn: no more sessions (still drawn, so later sessions stay where they were)
        roll, path = self.rng.random(), FUNNEL_PATHS[-1]
        for candidate in FUNNEL_PATHS:
            if roll < candidate.weight:
                path = candidate
                break
            roll -= candidate.weight
        if ts + path.longest_us() >= self.end_us:
            return  # it could outlast the run: every session that starts ends inside it, so drops are real
        self.sessions[path.name] += 1
        session = f"{self.rng.getrandbits(64):016x}"
        go_on = self.go_on(path, user.app_version, user.platform)
        for i, (action, screen) in enumerate(path.steps):
            if i:
                if self.rng.random() >= go_on[i - 1]:
                    return
                ts += self.rng.randint(*path.gap_s) * SECOND_US + self.rng.randrange(SECOND_US)
            self._push(self._event(user, ts, action, screen, session))

    @staticmethod
    def go_on(path: FunnelPath, app_version: str, platform: str) -> tuple[float, ...]:
        """The chances to reach each next step, for users of this app version and platform."""
        if path.name != STUCK.funnel or (app_version, platform) != (STUCK.app_version, STUCK.platform):
            return path.go_on
        names = [action for action, _ in path.steps]
        at = names.index(STUCK.step) - 1
        return tuple(STUCK.go_on if i == at else share for i, share in enumerate(path.go_on))

    def _event(self, user: User, ts: int, name: str, screen: str, session: str = "") -> BehaviourEvent:
        return BehaviourEvent(
            event_id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            user_id=user.user_id, account_id=user.account_id, ts_us=ts, name=name, screen=screen,
            app_version=user.app_version, platform=user.platform, region=user.region.name,
            attributes={"session_id": session} if session else {},
        )

    def _push(self, event: BehaviourEvent) -> None:
        self._seq += 1
        heapq.heappush(self.pending, (event.ts_us, self._seq, event))

    def due(self, until: float) -> list[BehaviourEvent]:
        """The events before ``until``, in time order; none of a user after they withdrew consent."""
        out = []
        while self.pending and self.pending[0][0] < until:
            _, _, event = heapq.heappop(self.pending)
            if event.name == WITHDRAWN or self.allows(event.user_id, event.ts_us):
                out.append(event)
        return out

    # ---- ground truth ------------------------------------------------------------------
    def label(self) -> BehaviourLabel:
        funnels = []
        for path in FUNNEL_PATHS:
            steps = [FunnelStepLabel(step=action, screen=screen, drop_share=round(1 - path.go_on[i - 1], 4) if i else 0.0)
                     for i, (action, screen) in enumerate(path.steps)]
            funnels.append(FunnelPathLabel(funnel=path.name, steps=steps, sessions=self.sessions[path.name],
                                           drop_step=_drop_step(path, path.go_on)))
        stuck_path = next(p for p in FUNNEL_PATHS if p.name == STUCK.funnel)
        stuck = StuckStepLabel(
            funnel=STUCK.funnel, step=STUCK.step, app_version=STUCK.app_version, platform=STUCK.platform,
            drop_share=round(1 - STUCK.go_on, 4),
            drop_step=_drop_step(stuck_path, self.go_on(stuck_path, STUCK.app_version, STUCK.platform)))
        withdrawn = [WithdrawalLabel(user_id=u, at_us=at) for u, at in sorted(self.withdrawn_at.items())]
        return BehaviourLabel(sessions=sum(self.sessions.values()), funnels=funnels, stuck=stuck, withdrawn=withdrawn)


