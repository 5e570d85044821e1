"""The traffic generator: a pure, deterministic function of a plan and a seed.

It walks simulated time one second at a time. Each second, every region sends
requests at ``rate × its share of users × its time-of-day factor``; each request
gets an outcome (the scenario's fault while it is active, else background noise,
else ok) and becomes one client span and the server spans of its call chain, all
sharing one request id. Some users whose request failed file a fault report a few
seconds later, carrying their client IP, request ids and recent client spans. Behaviour
paths (``behaviour``) and one account's sequence misuse (``misuse``) join in, each from a
generator of its own. Ground truth goes to labels, never into the events.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from supportlens.contracts import BehaviourEvent, Change, FaultReport, Record, Span
from supportlens.simulator import scenarios as sc
from supportlens.simulator.behaviour import BehaviourPaths
from supportlens.simulator.labels import (
    ChangeLabel, IncidentWindow, ReportLabel, RequestLabel, RolloutLabel, RolloutStep, RunLabel,
)
from supportlens.simulator.misuse import SequenceMisuse
from supportlens.simulator.draws import poisson
from supportlens.simulator.spans import hex_id, request_spans, serving_version, uuid4
from supportlens.simulator.world import OPERATION_BY_NAME, OPERATIONS, Operation, User, World

SECOND_US = 1_000_000
CLIENT_LOG_LENGTH = 10
REPORT_COOLDOWN_US = 300 * SECOND_US  # one user files at most one report per five minutes
REPORT_DELAY_US = (5 * SECOND_US, 60 * SECOND_US)  # a report arrives this long after the failure

# Chance that a user files a report after a request of this class: people report
# crashes and hard failures far more often than slowness.
REPORT_PROBABILITY = {
    sc.OK: 0.0002,
    sc.NETWORK_UNREACHABLE: 0.05,
    sc.NETWORK_SLOW: 0.01,
    sc.SERVER_ERROR: 0.05,
    sc.SERVER_SLOW: 0.01,
    sc.CLIENT_MISUSE: 0.03,
    sc.CLIENT_CRASH: 0.15,
}
USER_MESSAGES = {
    "en": {
        sc.OK: "Something seems off, please check.",
        sc.NETWORK_UNREACHABLE: "The app says it cannot connect.",
        sc.NETWORK_SLOW: "Everything is very slow.",
        sc.SERVER_ERROR: "My payment keeps failing.",
        sc.SERVER_SLOW: "Checkout takes forever.",
        sc.CLIENT_MISUSE: "Our integration gets errors when placing orders.",
        sc.CLIENT_CRASH: "The app crashed at checkout.",
    },
    "zh-CN": {
        sc.OK: "好像有点问题,请看一下。",
        sc.NETWORK_UNREACHABLE: "应用提示无法连接。",
        sc.NETWORK_SLOW: "所有操作都很慢。",
        sc.SERVER_ERROR: "付款一直失败。",
        sc.SERVER_SLOW: "结账要等很久。",
        sc.CLIENT_MISUSE: "我们的集成在下单时报错。",
        sc.CLIENT_CRASH: "结账时应用崩溃了。",
    },
}


def seasonal_factor(utc_hour: float, utc_offset_h: int) -> float:
    """Share of peak traffic at this hour: lowest at 04:00 local (0.1), highest at 16:00 (1.0)."""
    local = (utc_hour + utc_offset_h) % 24
    return 0.1 + 0.9 * (0.5 - 0.5 * math.cos(2 * math.pi * (local - 4) / 24))


@dataclass(frozen=True)
class Plan:
    scenario: sc.Scenario
    rate: float  # requests per simulated second at the daily peak
    duration_s: int
    seed: int
    start_us: int

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_s * SECOND_US

    @property
    def window_us(self) -> tuple[int, int]:
        lo, hi = self.scenario.window
        return (self.start_us + int(self.duration_s * lo * SECOND_US), self.start_us + int(self.duration_s * hi * SECOND_US))

    def at_us(self, fraction: float) -> int:
        """The time at this fraction of the run."""
        return self.start_us + int(self.duration_s * fraction * SECOND_US)

    @property
    def rollout_steps_us(self) -> list[tuple[int, float]]:
        """(time, share of the rolled-out service's requests on the new version from then); empty without a rollout."""
        rollout = self.scenario.rollout
        return [(self.at_us(fraction), share) for fraction, share in rollout.steps] if rollout else []

    def change_posts(self) -> list[tuple[int, Change, bool]]:
        """The change records of the run as (time posted, record, whether it caused the
        failures), in posting order. A rollout is posted when it starts (no ``finished_at_us``)
        and again, same ``change_id``, when it reaches everyone; a change from before the run
        is posted at its start. Change ids end in the run's start (s): runs never collide."""
        scenario = self.scenario
        run_tag = self.start_us // SECOND_US
        lo, _ = self.window_us
        posts: list[tuple[int, Change, bool]] = []
        for other in scenario.other_changes:
            started = lo - other.before_s * SECOND_US
            posts.append((started, Change(
                change_id=f"{other.change_id}-{run_tag}", kind=other.kind, service=other.service,  # type: ignore[arg-type]
                version=other.version, started_at_us=started, finished_at_us=started + other.lasted_s * SECOND_US,
                author=other.author, description=other.description, attributes=dict(other.attributes)), False))
        rollout = scenario.rollout
        if rollout is not None:
            steps = self.rollout_steps_us
            started, finished = steps[0][0], steps[-1][0]
            deploy = Change(
                change_id=f"{rollout.change_id}-{run_tag}", kind="deploy", service=rollout.service,
                version=rollout.to_version, from_version=rollout.from_version, started_at_us=started,
                author=rollout.author, link=rollout.link, description=rollout.description,
                attributes={"rollout": " → ".join(f"{share:.0%}" for _, share in steps)})
            posts.append((started, deploy, True))
            posts.append((finished, msgspec.structs.replace(deploy, finished_at_us=finished), True))
        posts.sort(key=lambda post: post[0])
        return posts


@dataclass(frozen=True)
class Emit:
    """One record for one logical topic."""

    topic: str
    key: str
    ts_us: int
    record: Record


@dataclass
class Tick:
    """What one simulated second produced."""

    second: int
    events: list[Emit] = field(default_factory=list)
    labels: list[RequestLabel | ReportLabel] = field(default_factory=list)


class Simulation:
    """Iterate :meth:`ticks` for the traffic, then read :meth:`summary`."""

    def __init__(self, plan: Plan, world: World) -> None:
        self.plan = plan
        self.world = world
        self.rng = random.Random(f"traffic:{plan.seed}:{plan.scenario.name}")
        self.by_region: dict[str, list[User]] = defaultdict(list)
        for user in world.users:
            self.by_region[user.region.name].append(user)
        chooser = plan.scenario.burst_users
        self.burst_users = [u for u in world.users if chooser(u, world)] if chooser else []
        self.recent: dict[str, deque[Span]] = defaultdict(lambda: deque(maxlen=CLIENT_LOG_LENGTH))
        self.recent_ids: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=3))
        self.last_report: dict[str, int] = {}
        self.pending: list[tuple[int, int, Emit, ReportLabel]] = []  # reports not yet due
        self.counts: Counter[str] = Counter()
        self.classes: Counter[str] = Counter()
        self.report_classes: Counter[str] = Counter()
        self.requests = 0
        self.visible = 0
        self._seq = 0
        # change records by the second of the run they are posted in (from before the run: the first)
        self.rollout_steps = plan.rollout_steps_us
        self.change_posts: dict[int, list[Change]] = defaultdict(list)
        for posted, change, _ in plan.change_posts():
            second = min(max(0, (posted - plan.start_us) // SECOND_US), plan.duration_s - 1)
            self.change_posts[second].append(change)
        # behaviour paths draw from a generator of their own: the traffic is the same with or without them
        self.behaviour = BehaviourPaths(plan.seed, plan.scenario.name, plan.start_us, plan.duration_s, world)
        # so do the sequence-misuse episodes (issue #18): one account's idempotency keys reused
        self.sequence_misuse = SequenceMisuse(plan, world)

    # ---- ids -------------------------------------------------------------------
    def _hex(self, bits: int) -> str:
        return hex_id(self.rng, bits)

    def _uuid(self) -> str:
        return uuid4(self.rng)

    # ---- the walk ----------------------------------------------------------------
    def accounts(self) -> list[Emit]:
        events = [Emit("accounts", a.account_id, self.plan.start_us, a) for a in self.world.accounts]
        self.counts["accounts"] += len(events)
        return events

    def ticks(self) -> Iterator[Tick]:
        plan = self.plan
        total_users = len(self.world.users)
        for second in range(plan.duration_s):
            tick = Tick(second)
            t0 = plan.start_us + second * SECOND_US
            for change in self.change_posts.get(second, ()):
                tick.events.append(Emit("changes", change.change_id, change.started_at_us, change))
                self.counts["changes"] += 1
            utc_hour = (t0 / 3_600_000_000) % 24
            rates: dict[str, float] = {}
            for region_name, users in self.by_region.items():
                share = len(users) / total_users
                factor = seasonal_factor(utc_hour, users[0].region.utc_offset_h)
                rates[region_name] = plan.rate * share * factor
                n = poisson(self.rng, plan.rate * share * factor)
                for _ in range(n):
                    user = self.rng.choice(users)
                    self._request(tick, user, t0 + self.rng.randrange(SECOND_US))
            lo, hi = plan.window_us
            if self.burst_users and lo <= t0 < hi:
                burst_op = OPERATION_BY_NAME[plan.scenario.burst_operation]
                for _ in range(poisson(self.rng, plan.rate * plan.scenario.burst_share)):
                    user = self.rng.choice(self.burst_users)
                    self._request(tick, user, t0 + self.rng.randrange(SECOND_US), burst_op)
            self._release_reports(tick, t0 + SECOND_US)
            self.behaviour.start_sessions(t0, rates)
            self._release_behaviour(tick, t0 + SECOND_US)
            self._release_misuse(tick, t0 + SECOND_US)
            tick.events.sort(key=lambda e: e.ts_us)
            yield tick
        # reports filed after the last second still arrive: the run is not cut short (nor are sessions)
        tail = Tick(plan.duration_s)
        self._release_reports(tail, math.inf)
        self._release_behaviour(tail, math.inf)
        self._release_misuse(tail, math.inf)
        tail.events.sort(key=lambda e: e.ts_us)
        if tail.events:
            yield tail

    def summary(self) -> RunLabel:
        plan = self.plan
        posts = plan.change_posts()
        latest = {change.change_id: (change, cause) for _, change, cause in posts}
        records = Counter(change.change_id for _, change, _ in posts)
        changes = [ChangeLabel(change_id=c.change_id, kind=c.kind, service=c.service, version=c.version,
                               started_at_us=c.started_at_us, finished_at_us=c.finished_at_us, cause=cause,
                               records=records[c.change_id])
                   for c, cause in latest.values()]
        suspect = next((c.change_id for c in changes if c.cause), "")
        expected = []
        if plan.scenario.expects_incident:
            lo, hi = plan.window_us
            expected.append(
                IncidentWindow(
                    scenario=plan.scenario.name,
                    expected_class=plan.scenario.expected_class,
                    dimension=dict(plan.scenario.dimension),
                    start_us=lo,
                    end_us=hi,
                    expected_suspect=suspect,
                )
            )
        rollout = plan.scenario.rollout
        rollout_label = None
        if rollout is not None:
            rollout_label = RolloutLabel(
                change_id=suspect, service=rollout.service, from_version=rollout.from_version,
                to_version=rollout.to_version,
                steps=[RolloutStep(at_us=at, share=share) for at, share in plan.rollout_steps_us],
                failure_probability=plan.scenario.probability, expected_class=plan.scenario.expected_class)
        return RunLabel(
            scenario=plan.scenario.name,
            seed=plan.seed,
            rate=plan.rate,
            duration_s=plan.duration_s,
            start_us=plan.start_us,
            end_us=plan.end_us,
            users=len(self.world.users),
            requests=self.requests,
            visible_requests=self.visible,
            counts=dict(sorted(self.counts.items())),
            classes=dict(sorted(self.classes.items())),
            report_classes=dict(sorted(self.report_classes.items())),
            expected_incidents=expected,
            scenario_window=plan.window_us,
            vip_accounts=sorted(self.world.vip_accounts),
            misuse_account=self.world.misuse_account,
            rollout=rollout_label,
            changes=changes,
            behaviour=self.behaviour.label(),
            sequence_misuse=self.sequence_misuse.label(),
        )

    # ---- one request -----------------------------------------------------------------
    def _outcome(self, user: User, op: Operation, ts: int, version: str = "") -> tuple[sc.Fault, bool]:
        scenario = self.plan.scenario
        lo, hi = self.plan.window_us
        in_window = lo <= ts < hi
        rollout = scenario.rollout
        if rollout is not None and version == rollout.to_version and self.rng.random() < scenario.probability:
            return sc.Fault(scenario.expected_class, service=rollout.service), in_window
        if in_window and scenario.effect is not None:
            fault = scenario.effect(user, op, self.world)
            if fault is not None and self.rng.random() < scenario.probability:
                return fault, True
        roll = self.rng.random()
        for cls, share in sc.NOISE.items():
            if roll < share:
                return sc.Fault(cls), in_window
            roll -= share
        return sc.Fault(sc.OK), in_window

    def _request(self, tick: Tick, user: User, ts: int, op: Operation | None = None) -> None:
        op = op or self._pick_operation()
        rollout = self.plan.scenario.rollout
        version = serving_version(rollout, self.rollout_steps, op, ts, self.rng)
        fault, in_window = self._outcome(user, op, ts, version)
        request_id = self._uuid()
        trace_id = self._hex(128)
        versioned = rollout.service if rollout is not None and version else ""
        server_spans, client_span, failing = request_spans(self.rng, user, op, fault, request_id, trace_id, ts,
                                                           versioned, version)
        self.requests += 1
        self.classes[fault.cls] += 1
        for span in server_spans:
            tick.events.append(Emit("server-spans", request_id, span.start_us, span))
        if user.consented:
            tick.events.append(Emit("client-spans", request_id, ts, client_span))
        self.counts["server-spans"] += len(server_spans)
        self.counts["client-spans"] += int(user.consented)
        if server_spans or user.consented:
            self.visible += 1
        self.recent[user.user_id].append(client_span)
        self.recent_ids[user.user_id].append(request_id)
        tick.labels.append(
            RequestLabel(
                request_id=request_id,
                scenario=self.plan.scenario.name,
                expected_class=fault.cls,
                start_us=ts,
                user_id=user.user_id,
                account_id=user.account_id,
                client_ip=user.client_ip,
                operation=op.name,
                failing_service=failing,
                server_spans=len(server_spans),
                client_span_emitted=user.consented,
                in_scenario_window=in_window,
            )
        )
        if user.consented and self.rng.random() < 0.2:
            event_id = self._uuid()  # drawn even when not sent (consent withdrawn): the traffic after it stays the same
            if self.behaviour.allows(user.user_id, ts):
                event = BehaviourEvent(
                    event_id=event_id,
                    user_id=user.user_id,
                    account_id=user.account_id,
                    ts_us=ts,
                    name="screen_view",
                    screen=op.screen,
                    app_version=user.app_version,
                    platform=user.platform,
                    region=user.region.name,
                )
                tick.events.append(Emit("behaviour", user.user_id, ts, event))
                self.counts["behaviour"] += 1
        self._maybe_report(user, fault.cls, request_id, client_span, ts, in_window)

    def _pick_operation(self) -> Operation:
        roll = self.rng.random()
        for op in OPERATIONS:
            if roll < op.weight:
                return op
            roll -= op.weight
        return OPERATIONS[-1]

    # ---- fault reports -------------------------------------------------------------
    def _maybe_report(self, user: User, cls: str, request_id: str, client_span: Span, ts: int, in_window: bool) -> None:
        last = self.last_report.get(user.user_id)
        if last is not None and ts - last < REPORT_COOLDOWN_US:
            return
        if self.rng.random() >= REPORT_PROBABILITY[cls]:
            return
        self.last_report[user.user_id] = ts
        received = ts + client_span.duration_us + self.rng.randrange(*REPORT_DELAY_US)
        report_id = self._uuid()
        others = [rid for rid in self.recent_ids[user.user_id] if rid != request_id][-2:]
        report = FaultReport(
            report_id=report_id,
            received_at_us=received,
            user_id=user.user_id,
            account_id=user.account_id,
            client_ip=user.client_ip,
            locale=user.locale,  # type: ignore[arg-type]
            app_version=user.app_version,
            platform=user.platform,
            region=user.region.name,
            network=user.network,
            request_ids=[request_id, *others],
            error_code=client_span.error_code,
            user_message=USER_MESSAGES[user.locale][cls],
            client_log=list(self.recent[user.user_id]),
        )
        label = ReportLabel(
            report_id=report_id,
            scenario=self.plan.scenario.name,
            expected_class=cls,
            received_at_us=received,
            user_id=user.user_id,
            account_id=user.account_id,
            request_ids=report.request_ids,
            in_scenario_window=in_window,
        )
        self._seq += 1
        heapq.heappush(self.pending, (received, self._seq, Emit("fault-reports", report_id, received, report), label))

    def _release_behaviour(self, tick: Tick, until: float) -> None:
        for event in self.behaviour.due(until):
            tick.events.append(Emit("behaviour", event.user_id, event.ts_us, event))
            self.counts["behaviour"] += 1

    def _release_misuse(self, tick: Tick, until: float) -> None:
        """The sequence-misuse episodes' records and labels before ``until``, counted as the traffic's are."""
        for due in self.sequence_misuse.due(until):
            if due.record is not None:
                tick.events.append(Emit(due.topic, due.key, due.ts_us, due.record))
                self.counts[due.topic] += 1
            label = due.label
            if isinstance(label, RequestLabel):
                self.requests += 1
                self.classes[label.expected_class] += 1
                self.visible += int(label.server_spans > 0 or label.client_span_emitted)
            elif isinstance(label, ReportLabel):
                self.report_classes[label.expected_class] += 1
            if label is not None:
                tick.labels.append(label)

    def _release_reports(self, tick: Tick, until: float) -> None:
        while self.pending and self.pending[0][0] < until:
            _, _, emit, label = heapq.heappop(self.pending)
            tick.events.append(emit)
            tick.labels.append(label)
            self.counts["fault-reports"] += 1
            self.report_classes[label.expected_class] += 1

