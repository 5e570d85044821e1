"""Misuse that fails elsewhere (issue #18): one account's integration reuses idempotency keys.

The catalog's ``[sequences.idempotency-key-reuse]``: the integration sends ``POST /v1/orders``
with the ``idempotency_key`` of an earlier order but another ``body_sha256``; the API silently
answers with the earlier order, and minutes later ``POST /v1/payments/confirm`` fails at the
payment service (500 ``AMOUNT_MISMATCH``: the amount is not that of the order it got). The
user reports that failure, which on its own reads "our payment service failed"; the truth
(:class:`SequenceMisuseLabel`) is the misuse, found only in the user's sequence of requests.

Every scenario has a few such episodes of the first standard account's first user
(:func:`~supportlens.simulator.world.integration_user`). Every random draw here comes from a
generator of its own, seeded from the run's seed: the traffic, the behaviour paths and their
ids are the same with or without the episodes, and the same as before they existed.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supportlens.contracts import FaultReport, Record, Span
from supportlens.simulator import scenarios as sc
from supportlens.simulator.labels import ReportLabel, RequestLabel, SequenceEpisodeLabel, SequenceMisuseLabel
from supportlens.simulator.spans import hex_id, request_spans, serving_version, uuid4
from supportlens.simulator.world import OPERATION_BY_NAME, Operation, User, World, integration_user

if TYPE_CHECKING:  # only for the annotation: generate imports this module
    from supportlens.simulator.generate import Plan

SECOND_US = 1_000_000
RULE = "idempotency-key-reuse"
CODE = "IDEMPOTENCY_KEY_REUSED"
KEY, BODY = "idempotency_key", "body_sha256"  # the attributes the rule reads (problem_catalog.toml)
ORDER = OPERATION_BY_NAME["POST /v1/orders"]
CONFIRM = OPERATION_BY_NAME["POST /v1/payments/confirm"]
FAILURE = (500, "AMOUNT_MISMATCH")  # the payment's answer to an amount its order never had
SPREAD = (0.15, 0.75)  # episodes start in this part of the run
REUSED_AFTER_US = (3 * SECOND_US, 10 * SECOND_US)  # order B after order A
FAILS_AFTER_US = (20 * SECOND_US, 60 * SECOND_US)  # the payment confirmation after order B
REPORTED_AFTER_US = (5 * SECOND_US, 30 * SECOND_US)  # the report after the failure's answer
USER_MESSAGES = {  # what the user says: the payment failed (the symptom, not its cause)
    "en": "Payment confirmation fails with a server error after we place an order.",
    "zh-CN": "下单后确认付款时返回服务器错误。",
}


@dataclass(frozen=True)
class Due:
    """One record (``topic``, ``key``, ``record``) or one ground-truth ``label``, due at ``ts_us``."""

    ts_us: int
    topic: str = ""
    key: str = ""
    record: Record | None = None
    label: RequestLabel | ReportLabel | None = None


def episode_count(duration_s: int) -> int:
    """Episodes in a run: one per 100 s, at least one, at most five."""
    return min(5, max(1, duration_s // 100))


LONGEST_US = REUSED_AFTER_US[1] + FAILS_AFTER_US[1] + REPORTED_AFTER_US[1] + 10 * SECOND_US  # an episode, and its answers


def episode_starts(rng: random.Random, start_us: int, duration_s: int, n: int) -> list[int]:
    """``n`` times spread over :data:`SPREAD` of the run, one at random in each of ``n`` equal
    slots, each early enough for its episode to end inside the run: a record after the run's end
    would be event time in the future of a run that ends now, moving the worker's clock past it."""
    lo, hi = (start_us + int(duration_s * f * SECOND_US) for f in SPREAD)
    hi = min(hi, start_us + duration_s * SECOND_US - LONGEST_US)
    if hi <= lo:
        return []  # too short a run for an episode
    slot = (hi - lo) // n
    return [lo + i * slot + rng.randrange(max(1, slot)) for i in range(n)]


def body_hashes(rng: random.Random) -> tuple[str, str]:
    """Two different SHA-256 hex digests: the earlier order's body and the misusing order's."""
    first = hex_id(rng, 256)
    second = hex_id(rng, 256)
    while second == first:  # never in practice; the label's truth depends on it
        second = hex_id(rng, 256)
    return first, second


class SequenceMisuse:
    """The episodes of one run, built up front and released second by second (:meth:`due`)."""

    def __init__(self, plan: Plan, world: World) -> None:
        self.plan = plan
        self.rng = random.Random(f"sequence-misuse:{plan.seed}:{plan.scenario.name}")
        self.steps_us = plan.rollout_steps_us
        self.user = integration_user(world, world.sequence_misuse_account)
        self.episodes: list[SequenceEpisodeLabel] = []
        self.pending: list[tuple[int, int, Due]] = []
        self._seq = 0
        if self.user is not None:
            for at in episode_starts(self.rng, plan.start_us, plan.duration_s, episode_count(plan.duration_s)):
                self.episodes.append(self._episode(self.user, at))

    # ---- generation ----------------------------------------------------------------
    def _episode(self, user: User, at: int) -> SequenceEpisodeLabel:
        key = uuid4(self.rng)
        first_body, other_body = body_hashes(self.rng)
        earlier, earlier_client = self._request(user, ORDER, at, sc.Fault(sc.OK), {KEY: key, BODY: first_body})
        misuse_at = at + self.rng.randrange(*REUSED_AFTER_US)
        misuse, misuse_client = self._request(user, ORDER, misuse_at, sc.Fault(sc.OK), {KEY: key, BODY: other_body})
        failed_at = misuse_at + self.rng.randrange(*FAILS_AFTER_US)
        failure, failure_client = self._request(user, CONFIRM, failed_at, sc.Fault(sc.SERVER_ERROR, service="payment"),
                                                failure=FAILURE)
        report = self._report(user, failure, failure_client, [failure, misuse, earlier],
                              [earlier_client, misuse_client, failure_client])
        return SequenceEpisodeLabel(
            earlier_request_id=earlier.request_id, misuse_request_id=misuse.request_id, misuse_at_us=misuse_at,
            failure_request_id=failure.request_id, report_id=report.report_id,
            report_received_at_us=report.received_at_us)

    def _request(self, user: User, op: Operation, ts: int, fault: sc.Fault, attributes: dict[str, str] | None = None,
                 failure: tuple[int, str] | None = None) -> tuple[RequestLabel, Span]:
        """One request, shaped as the traffic's are; its spans are queued, its label returned (queued too)."""
        rollout = self.plan.scenario.rollout
        version = serving_version(rollout, self.steps_us, op, ts, self.rng)
        versioned = rollout.service if rollout is not None and version else ""
        request_id = uuid4(self.rng)
        trace_id = hex_id(self.rng, 128)
        server, client, failing = request_spans(self.rng, user, op, fault, request_id, trace_id, ts, versioned,
                                                version, failure=failure, attributes=attributes)
        for span in server:  # server spans always; the client span only with the user's consent
            self._push(Due(span.start_us, "server-spans", request_id, span))
        if user.consented:
            self._push(Due(ts, "client-spans", request_id, client))
        label = RequestLabel(
            request_id=request_id, scenario=self.plan.scenario.name, expected_class=fault.cls, start_us=ts,
            user_id=user.user_id, account_id=user.account_id, client_ip=user.client_ip, operation=op.name,
            failing_service=failing, server_spans=len(server), client_span_emitted=user.consented,
            in_scenario_window=self._in_window(ts))
        self._push(Due(ts, label=label))
        return label, client

    def _report(self, user: User, failure: RequestLabel, failure_client: Span, requests: list[RequestLabel],
                client_log: list[Span]) -> FaultReport:
        """The user's report of the failure, always filed: it names the failing request first, then
        the orders before it; its client log is the episode's (as the app keeps it, consent or not)."""
        received = failure.start_us + failure_client.duration_us + self.rng.randrange(*REPORTED_AFTER_US)
        report = FaultReport(
            report_id=uuid4(self.rng), received_at_us=received, user_id=user.user_id, account_id=user.account_id,
            client_ip=user.client_ip, locale=user.locale,  # type: ignore[arg-type]
            app_version=user.app_version, platform=user.platform, region=user.region.name, network=user.network,
            request_ids=[r.request_id for r in requests], error_code=failure_client.error_code,
            user_message=USER_MESSAGES[user.locale], client_log=client_log)
        label = ReportLabel(
            report_id=report.report_id, scenario=self.plan.scenario.name,
            expected_class=sc.CLIENT_MISUSE,  # the truth: the misuse, not the server error it looks like
            received_at_us=received, user_id=user.user_id, account_id=user.account_id,
            request_ids=report.request_ids, in_scenario_window=failure.in_scenario_window)
        self._push(Due(received, "fault-reports", report.report_id, report, label))
        return report

    def _in_window(self, ts: int) -> bool:
        lo, hi = self.plan.window_us
        return lo <= ts < hi

    def _push(self, due: Due) -> None:
        self._seq += 1
        heapq.heappush(self.pending, (due.ts_us, self._seq, due))

    # ---- release ------------------------------------------------------------------------
    def due(self, until: float) -> list[Due]:
        """The records and labels before ``until``, in time order."""
        out = []
        while self.pending and self.pending[0][0] < until:
            out.append(heapq.heappop(self.pending)[2])
        return out

    # ---- ground truth ------------------------------------------------------------------
    def label(self) -> SequenceMisuseLabel | None:
        if self.user is None:
            return None
        return SequenceMisuseLabel(account_id=self.user.account_id, user_id=self.user.user_id, rule=RULE, code=CODE,
                                   surfaced_as=sc.SERVER_ERROR, surfaced_in="payment", episodes=list(self.episodes))
