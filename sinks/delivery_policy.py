"""What the notification delivery does with a notification and with each attempt's result.

Pure decisions, no I/O, so each can be tested alone: where a notification goes
(:func:`route`: drills only to the drill channel), whether an account is over its hourly
limit (:class:`AccountRateLimiter`), how a receiver's answer reads
(:func:`http_result`, :func:`smtp_result`), and what follows an attempt
(:func:`after_attempt`: delivered, retried after an exponential backoff with full jitter,
or dead-lettered). ``sinks/notifications.py`` moves the records and calls these.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from supportlens.contracts import Channel, DeliveryOutcome, Notification

# Answers that say "not now" rather than "never": the same request may succeed later.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` attempts in all; the n-th retry waits a random time below
    ``min(max_s, first_s · 2ⁿ⁻¹)`` (exponential backoff with full jitter)."""

    max_attempts: int
    first_s: float
    max_s: float

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        return backoff_delay(failures, self.first_s, self.max_s, rng)


def backoff_delay(failures: int, first_s: float, max_s: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``failures``-th failed attempt (1, 2, …): uniformly in
    ``[0, min(max_s, first_s · 2^(failures-1)))``. Full jitter spreads the retries of many
    notifications to one recovering endpoint instead of sending them in waves."""
    ceiling = min(max_s, first_s * 2 ** min(max(0, failures - 1), 62))
    return rng() * ceiling


@dataclass(frozen=True)
class SendResult:
    """How one attempt went: ``detail`` is the HTTP status or SMTP reply (never a secret),
    ``permanent`` says a retry cannot help, ``retry_after_s`` is the receiver's own wish."""

    ok: bool
    detail: str
    permanent: bool = False
    retry_after_s: float | None = None


def http_result(status: int, reason: str = "", retry_after: str | None = None) -> SendResult:
    """A webhook's answer: 2xx delivered; 3xx (redirects are not followed: the signed request
    would go elsewhere) and 4xx refused for good, except 408/425/429; 5xx retried."""
    detail = f"HTTP {status} {reason}".strip()
    if 200 <= status < 300:
        return SendResult(True, detail)
    permanent = 300 <= status < 500 and status not in RETRYABLE_CLIENT_STATUSES
    wait = _retry_after_seconds(retry_after) if status in (429, 503) else None
    return SendResult(False, detail, permanent=permanent, retry_after_s=wait)


def _retry_after_seconds(value: str | None) -> float | None:
    # Only the delay-seconds form; an HTTP-date is rare from webhook receivers and ignored.
    if value and value.strip().isascii() and value.strip().isdigit():
        return float(value.strip())
    return None


def smtp_result(code: int, message: str) -> SendResult:
    """An SMTP server's reply: 2xx accepted, 4xx try again later, 5xx refused for good (RFC 5321 §4.2.1)."""
    detail = f"SMTP {code} {message}".strip()[:512]
    return SendResult(200 <= code < 300, detail, permanent=code >= 500)


@dataclass(frozen=True)
class Decision:
    """The outcome recorded for an attempt, and when to try again (``None``: final)."""

    outcome: DeliveryOutcome
    retry_in_s: float | None = None


def after_attempt(
    result: SendResult, attempt: int, policy: RetryPolicy, rng: Callable[[], float] = random.random
) -> Decision:
    """What follows attempt number ``attempt`` (1, 2, …): delivered; dead-lettered when the failure
    is permanent or this was the last attempt allowed; else failed and retried after a backoff
    (longer when the receiver asked for it, but never past ``policy.max_s``)."""
    if result.ok:
        return Decision("delivered")
    if result.permanent or attempt >= policy.max_attempts:
        return Decision("dead_lettered")
    delay = policy.delay(attempt, rng)
    if result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, policy.max_s))
    return Decision("failed", retry_in_s=delay)


@dataclass(frozen=True)
class Route:
    """Where a notification goes: ``send`` to ``target`` over ``channel``, or ``skip`` with a
    final ``outcome`` and the reason in ``detail``."""

    action: Literal["send", "skip"]
    channel: Channel
    target: str = ""
    to_drill_channel: bool = False
    outcome: DeliveryOutcome | None = None
    detail: str = ""


def route(notification: Notification, drill_webhook_url: str) -> Route:
    """A drill notification never goes to its ``to``: to the drill webhook when one is set, else
    nowhere (``skipped_drill``). A notification without a channel or address is not sent (``no_channel``)."""
    if notification.drill:
        if drill_webhook_url:
            return Route("send", "webhook", drill_webhook_url, to_drill_channel=True)
        return Route("skip", notification.channel, outcome="skipped_drill",
                     detail="drill: no drill channel configured (drill_webhook_url), not sent")
    if notification.channel == "none" or not notification.to.strip():
        what = "channel none" if notification.channel == "none" else f"no address for channel {notification.channel}"
        return Route("skip", notification.channel, outcome="no_channel", detail=f"{what}, not sent")
    return Route("send", notification.channel, notification.to.strip())


class AccountRateLimiter:
    """At most ``limit`` notifications per account in any ``window_s`` (a sliding window).

    A notification is counted once, when admitted: its retries are not counted again, and
    the same ``notification_id`` read again (a re-delivery) is admitted without counting.
    State is in memory; notifications are keyed by account, so one consumer sees all of an
    account's notifications, but a restart or a rebalance starts the window afresh.
    """

    def __init__(self, limit: int, window_s: float = 3600.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._admitted: dict[str, deque[tuple[float, str]]] = {}

    def admit(self, account_id: str, notification_id: str, now: float) -> bool:
        admitted = self._admitted.setdefault(account_id, deque())
        while admitted and admitted[0][0] <= now - self.window_s:
            admitted.popleft()
        if any(known == notification_id for _, known in admitted):
            return True
        if len(admitted) >= self.limit:
            return False
        admitted.append((now, notification_id))
        return True
