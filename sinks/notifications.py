"""Notification delivery: ``notifications`` → signed webhook or SMTP e-mail → ``deliveries``.

Guarantee: every notification read reaches a final outcome — ``delivered``,
``dead_lettered`` (on ``dlq``, replayable), ``rate_limited``, ``skipped_drill`` or
``no_channel`` — before its offset is committed, so none is lost: a crash re-reads what
was not final. A notification can therefore be sent twice (sent, then the process died
before the commit); every request carries its ``notification_id`` (header
``X-Supportlens-Notification-Id``, and the e-mail's ``Message-ID``) for receivers to
drop a repeat. Every attempt is a :class:`DeliveryAttempt` on ``deliveries`` (stored in
ClickHouse by the sink) and a count in ``supportlens_notification_deliveries_total``.

Retries do not hold up other accounts: a failed notification is put back on a due-time
queue and the loop goes on reading and sending; offsets are committed per partition up
to the lowest offset not yet final. One account's notifications go out one at a time, in
the order they were written, so a customer never reads "resolved" before "declared".

Decisions (routing, rate limit, backoff, what an answer means) are the pure functions of
:mod:`sinks.delivery_policy`; this module only moves records and talks to the network.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import re
import signal
import smtplib
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import formatdate
from hashlib import sha256
from ipaddress import ip_address

import msgspec
import requests
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from sinks.delivery_policy import (
    AccountRateLimiter,
    RetryPolicy,
    Route,
    SendResult,
    after_attempt,
    http_result,
    route,
    smtp_result,
)
from sinks.signing import SIGNATURE_HEADER, signature_header
from streams.dead_letters import dead_letter_headers
from supportlens.config import Settings
from supportlens.contracts import Channel, DeliveryAttempt, DeliveryOutcome, InvalidRecord, Notification, decode, encode
from supportlens.errors import UserError
from supportlens.metrics import Metrics, process_metrics, serve_metrics
from supportlens.topic_reader import TRANSIENT_ERRORS
from supportlens.topics import require_topics

log = logging.getLogger(__name__)

NOTIFICATION_ID_HEADER = "X-Supportlens-Notification-Id"
ATTEMPT_HEADER = "X-Supportlens-Attempt"
USER_AGENT = "supportlens-notify/1"
READY_LINE = "notify ready"

POLL_S = 0.2
COMMIT_EVERY_S = 1.0
MAX_PENDING = 1000  # notifications read but not final; past this, reading pauses until half are done
SHUTDOWN_WAIT_S = 30.0

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")

TP = tuple[str, int]


# -- what is sent (pure) ---------------------------------------------------------------

def created_at_iso(created_at_us: int) -> str:
    """``created_at_us`` as ISO 8601 UTC with microseconds, e.g. ``2025-03-01T08:00:00.000000Z``."""
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=created_at_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def webhook_body(notification: Notification) -> bytes:
    """The JSON a webhook receiver gets (UTF-8, non-ASCII text as is); these exact bytes are signed."""
    return msgspec.json.encode({
        "notification_id": notification.notification_id,
        "account_id": notification.account_id,
        "kind": notification.kind,
        "incident_id": notification.incident_id,
        "locale": notification.locale,
        "subject": notification.subject,
        "body": notification.body,
        "created_at": created_at_iso(notification.created_at_us),
        "drill": notification.drill,
    })


def webhook_headers(secret: str, notification: Notification, body: bytes, attempt: int, now_s: int) -> dict[str, str]:
    """Headers of one webhook attempt: signed anew each time, so a retry minutes later still
    falls inside the receiver's timestamp tolerance."""
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        NOTIFICATION_ID_HEADER: notification.notification_id,
        ATTEMPT_HEADER: str(attempt),
        SIGNATURE_HEADER: signature_header(secret, now_s, body),
    }


def message_id(notification_id: str, sender: str) -> str:
    """A Message-ID that is the same for every attempt of one notification (receivers dedupe on it)."""
    domain = sender.rpartition("@")[2] or "supportlens"
    local = notification_id if _DOT_ATOM.match(notification_id) else sha256(notification_id.encode()).hexdigest()[:40]
    return f"<{local}@{domain}>"


def email_message(notification: Notification, sender: str, to: str, now_s: float) -> EmailMessage:
    """The e-mail for a notification: UTF-8 subject (RFC 2047) and body (base64: 7-bit clean for any relay)."""
    msg = EmailMessage()
    msg["Subject"] = notification.subject
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = formatdate(now_s, usegmt=True)
    msg["Message-ID"] = message_id(notification.notification_id, sender)
    msg[NOTIFICATION_ID_HEADER] = notification.notification_id
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies to us
    msg.set_content(notification.body, charset="utf-8", cte="base64")
    msg["Content-Language"] = notification.locale  # after set_content, which replaces every Content-* header
    return msg


# -- talking to receivers (I/O, on sender threads) --------------------------------------

def check_notify_settings(settings: Settings) -> None:
    """Refuse settings that would send unsigned webhooks or an SMTP password in clear text."""
    if settings.notify_webhook_secret is None or not settings.notify_webhook_secret.get_secret_value():
        raise UserError("notification delivery needs a webhook signing secret",
                        hint="set SUPPORTLENS_NOTIFY_WEBHOOK_SECRET (environment or secrets file); "
                             "receivers verify X-Supportlens-Signature with it")
    check_smtp_settings(settings)


def check_smtp_settings(settings: Settings) -> None:
    """Refuse settings that would send the SMTP password in clear text."""
    if settings.smtp_username and not settings.smtp_starttls and not _is_loopback(settings.smtp_host):
        raise UserError(f"refusing to send the SMTP password to {settings.smtp_host} without TLS",
                        hint="set SUPPORTLENS_SMTP_STARTTLS=true")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False



class _ReplySMTP(smtplib.SMTP):
    """smtplib keeps the server's answer to DATA to itself; this keeps it for the record."""

    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg):  # type: ignore[no-untyped-def]
        self.data_reply = super().data(msg)
        return self.data_reply


class Senders:
    """Sends one attempt by webhook or e-mail and says how it went; never raises, never logs a secret
    or a target address (webhook URLs often carry a token, e-mail addresses are personal)."""

    def __init__(self, settings: Settings) -> None:
        check_notify_settings(settings)
        assert settings.notify_webhook_secret is not None
        self._secret = settings.notify_webhook_secret.get_secret_value()
        self.settings = settings
        self._local = threading.local()

    def send(self, channel: Channel, target: str, notification: Notification, attempt: int) -> SendResult:
        try:
            if channel == "webhook":
                return self.webhook(target, notification, attempt)
            if channel == "email":
                return self.email(target, notification)
            return SendResult(False, f"channel {channel} cannot be sent", permanent=True)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: recorded, retried, dead-lettered in the end
            log.exception("notify: sending %s failed unexpectedly", notification.notification_id)
            return SendResult(False, f"internal error ({type(exc).__name__})")

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def webhook(self, url: str, notification: Notification, attempt: int) -> SendResult:
        if not url.startswith(("http://", "https://")):
            return SendResult(False, "invalid webhook URL (not http or https)", permanent=True)
        body = webhook_body(notification)
        headers = webhook_headers(self._secret, notification, body, attempt, int(time.time()))
        timeout = self.settings.notify_timeout_s
        try:
            # stream: the answer's body is never read, so a huge one costs nothing
            with self._session().post(url, data=body, headers=headers, timeout=(timeout, timeout),
                                      allow_redirects=False, stream=True) as response:
                return http_result(response.status_code, response.reason or "", response.headers.get("Retry-After"))
        # requests' messages name the URL: only fixed phrases go into the record
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
            return SendResult(False, "invalid webhook URL", permanent=True)
        except requests.exceptions.ConnectTimeout:
            return SendResult(False, f"no connection within {timeout:g} s")
        except requests.exceptions.ReadTimeout:
            return SendResult(False, f"no answer within {timeout:g} s")
        except requests.exceptions.SSLError:
            return SendResult(False, "TLS handshake or certificate check failed")
        except requests.exceptions.ConnectionError:
            return SendResult(False, "connection failed")
        except requests.exceptions.RequestException as exc:
            return SendResult(False, f"request failed ({type(exc).__name__})")

    def email(self, to: str, notification: Notification) -> SendResult:
        if not _EMAIL.match(to) or any(ord(c) < 32 for c in to):
            return SendResult(False, "invalid e-mail address", permanent=True)
        return smtp_send(self.settings, email_message(notification, self.settings.smtp_from, to, time.time()))


def smtp_send(s: Settings, message: EmailMessage) -> SendResult:
    """One attempt to hand ``message`` to the configured SMTP server; never raises."""
    try:
        with _ReplySMTP(s.smtp_host, s.smtp_port, timeout=s.notify_timeout_s) as smtp:
            if s.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                smtp.login(s.smtp_username, password)
            smtp.send_message(message)
            code, reply = smtp.data_reply
    except smtplib.SMTPRecipientsRefused as exc:
        code, reply = next(iter(exc.recipients.values()))
    except smtplib.SMTPResponseException as exc:  # sender refused, data refused, login refused, …
        code, reply = exc.smtp_code, exc.smtp_error
    except smtplib.SMTPNotSupportedError as exc:
        return SendResult(False, f"SMTP server lacks a needed extension: {exc}", permanent=True)
    except (smtplib.SMTPException, OSError) as exc:
        return SendResult(False, f"SMTP server unreachable or hung up ({type(exc).__name__})")
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return smtp_result(code, " ".join(text.split()))


# -- offsets ---------------------------------------------------------------------------

class PendingOffsets:
    """Per partition, the offsets read but not final, and the position that may be committed:
    the lowest of them, or (none open) one past the highest offset read."""

    def __init__(self) -> None:
        self._open: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def __len__(self) -> int:
        return sum(len(offsets) for offsets in self._open.values())

    def read(self, tp: TP, offset: int) -> None:
        self._open.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        self._open.get(tp, set()).discard(offset)

    def committable(self, only: set[TP] | None = None) -> dict[TP, int]:
        """Positions that moved since the last :meth:`committed`."""
        positions = {}
        for tp, after in self._next.items():
            if only is not None and tp not in only:
                continue
            open_offsets = self._open.get(tp)
            position = min(open_offsets) if open_offsets else after
            if self._committed.get(tp) != position:
                positions[tp] = position
        return positions

    def committed(self, positions: dict[TP, int]) -> None:
        self._committed.update(positions)

    def forget(self, tps: set[TP]) -> None:
        for tp in tps:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


# -- the loop --------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """A notification being delivered: where it came from (for commit and dead letter) and how far it got."""

    notification: Notification
    route: Route
    tp: TP
    offset: int
    key: bytes | None
    value: bytes
    attempts: int = 0
    owned: bool = True  # False once its partition was revoked: its result is recorded, nothing follows


class DeliveryRecordLost(RuntimeError):
    """Kafka did not take a delivery record or dead letter: nothing may be committed after it."""


class NotificationDelivery:
    """One consumer in group ``<prefix>notify`` delivering ``notifications``.

    Run :meth:`run` (blocking) and set ``stop`` to end it: sends under way finish and are
    recorded, pending retries stay uncommitted and are read again at the next start.
    Several processes in the group share the partitions; an account's notifications all
    land on one partition (keyed by account), so its rate limit and order hold.
    """

    def __init__(self, settings: Settings, metrics: Metrics, stop: threading.Event,
                 rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        self.rng = rng
        self.senders = Senders(settings)
        self.topic = settings.topic("notifications")
        self.policy = RetryPolicy(settings.notify_max_attempts, settings.notify_backoff_first_s,
                                  settings.notify_backoff_max_s)
        self.limiter = AccountRateLimiter(settings.notify_max_per_account_per_hour)
        self.offsets = PendingOffsets()
        self.accounts: dict[str, deque[Job]] = {}  # per account, in order; the head is the one being worked on
        self.due: list[tuple[float, int, Job]] = []  # heads waiting for their (re)try time
        self.running: dict[Future[SendResult], Job] = {}
        self.outcomes: Counter[str] = Counter()
        self.paused = False
        self.last_commit = 0.0
        self._seq = itertools.count()
        self._produce_error: str | None = None
        self.executor = ThreadPoolExecutor(settings.notify_senders, thread_name_prefix="notify-send")
        self.consumer = Consumer(settings.kafka_config(**{
            "group.id": f"{settings.topic_prefix}notify",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }))
        self.producer = Producer(settings.producer_config(**{"linger.ms": 5, "enable.idempotence": True}))

    def run(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        clean = False
        try:
            while not self.stop.is_set():
                self._backpressure()
                messages = self.consumer.consume(num_messages=500, timeout=self._poll_timeout())
                for message in messages:
                    self._take(message)
                self._collect()
                self._start_due()
                if time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
                    self._commit()
            clean = True
        finally:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self._collect(block_s=SHUTDOWN_WAIT_S)
            if clean:
                self._commit()
            self.consumer.close()
            self.producer.flush(10)

    def _poll_timeout(self) -> float:
        if self.running:
            return min(POLL_S, 0.05)  # a send may finish any moment
        if self.due:
            return max(0.0, min(POLL_S, self.due[0][0] - time.monotonic()))
        return POLL_S

    # -- reading ------------------------------------------------------------------------

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() in TRANSIENT_ERRORS or error.retriable():
                log.debug("notify: transient consumer error: %s", error)
            else:
                log.warning("notify: consumer error: %s", error)
            return
        tp, offset = (message.topic(), message.partition()), message.offset()
        self.offsets.read(tp, offset)
        self.metrics.events_in.labels("notifications").inc()
        value = message.value() or b""
        try:
            notification = decode(value, Notification, self.settings.max_record_bytes)
        except InvalidRecord as exc:
            self._dead_letter(message.key(), value, tp, offset, exc.reason)
            self.offsets.done(tp, offset)
            return
        plan = route(notification, self.settings.drill_webhook_url)
        if plan.action == "skip":
            assert plan.outcome is not None
            self._record(notification, 1, plan.channel, plan.outcome, plan.detail)
            self.offsets.done(tp, offset)
            return
        if not notification.drill and not self.limiter.admit(
            notification.account_id, notification.notification_id, time.monotonic()
        ):
            limit = self.settings.notify_max_per_account_per_hour
            self._record(notification, 1, plan.channel, "rate_limited",
                         f"over {limit} notifications to this account within an hour; not sent")
            self.offsets.done(tp, offset)
            return
        job = Job(notification, plan, tp, offset, message.key(), value)
        queue = self.accounts.setdefault(notification.account_id, deque())
        queue.append(job)
        if len(queue) == 1:
            self._schedule(job, time.monotonic())

    def _backpressure(self) -> None:
        pending = len(self.offsets)
        try:
            if not self.paused and pending >= MAX_PENDING:
                self.consumer.pause(self.consumer.assignment())
                self.paused = True
                log.info("notify: %d notifications pending; reading paused", pending)
            elif self.paused and pending < MAX_PENDING // 2:
                self.consumer.resume(self.consumer.assignment())
                self.paused = False
        except KafkaException as exc:  # a rebalance under way: try again next round
            log.debug("notify: pause/resume failed: %s", exc)

    # -- sending ------------------------------------------------------------------------

    def _schedule(self, job: Job, at: float) -> None:
        heapq.heappush(self.due, (at, next(self._seq), job))

    def _start_due(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now and len(self.running) < self.settings.notify_senders:
            _, _, job = heapq.heappop(self.due)
            if not job.owned:
                continue
            job.attempts += 1
            future = self.executor.submit(self.senders.send, job.route.channel, job.route.target,
                                          job.notification, job.attempts)
            self.running[future] = job

    def _collect(self, block_s: float = 0.0) -> None:
        if not self.running:
            return
        done, _ = wait(list(self.running), timeout=block_s, return_when=ALL_COMPLETED if block_s else FIRST_COMPLETED)
        for future in done:
            job = self.running.pop(future)
            self._settle(job, future.result())

    def _settle(self, job: Job, result: SendResult) -> None:
        n, plan = job.notification, job.route
        decision = after_attempt(result, job.attempts, self.policy, self.rng)
        outcome = decision.outcome
        if not job.owned and outcome == "dead_lettered":
            outcome = "failed"  # its partition has a new owner, who retries it from the start
        detail = f"drill channel: {result.detail}" if plan.to_drill_channel else result.detail
        if outcome == "dead_lettered":
            why = "refused for good" if result.permanent else f"gave up after {job.attempts} attempts"
            detail = f"{detail}; {why}, sent to dlq"
        self._record(n, job.attempts, plan.channel, outcome, detail)
        if not job.owned:
            return
        if outcome == "failed":
            assert decision.retry_in_s is not None
            log.info("notify: %s to account %s failed (attempt %d: %s); retry in %.1f s",
                     n.notification_id, n.account_id, job.attempts, detail, decision.retry_in_s)
            self._schedule(job, time.monotonic() + decision.retry_in_s)
            return
        if outcome == "dead_lettered":
            self._dead_letter(job.key, job.value, job.tp, job.offset,
                              f"notification {n.notification_id} not delivered: {detail}")
            log.warning("notify: %s to account %s dead-lettered: %s", n.notification_id, n.account_id, detail)
        else:
            log.info("notify: %s to account %s delivered by %s (attempt %d: %s)",
                     n.notification_id, n.account_id, plan.channel, job.attempts, detail)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        self.offsets.done(job.tp, job.offset)
        queue = self.accounts.get(job.notification.account_id)
        if queue and queue[0] is job:
            queue.popleft()
            if queue:
                self._schedule(queue[0], time.monotonic())
            else:
                del self.accounts[job.notification.account_id]

    # -- writing ------------------------------------------------------------------------

    def _record(self, n: Notification, attempt: int, channel: Channel, outcome: DeliveryOutcome, detail: str) -> None:
        record = DeliveryAttempt(
            notification_id=n.notification_id, attempt=attempt, account_id=n.account_id,
            at_us=int(time.time() * 1_000_000), channel=channel, outcome=outcome, detail=detail[:4096], drill=n.drill,
        )
        self._produce(self.settings.topic("deliveries"), n.notification_id.encode(), encode(record))
        self.metrics.notification_deliveries.labels(channel, outcome).inc()
        self.metrics.events_out.labels("deliveries").inc()
        self.outcomes[outcome] += 1

    def _dead_letter(self, key: bytes | None, value: bytes, tp: TP, offset: int, reason: str) -> None:
        self._produce(self.settings.topic("dlq"), key, value, dead_letter_headers(reason, tp[0], tp[1], offset))
        self.metrics.dead_letters.labels("notifications").inc()

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: dict[str, bytes] | None = None) -> None:
        self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery)
        self.producer.poll(0)

    def _on_delivery(self, error, message) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            self._produce_error = f"{message.topic()}: {error}"

    def _commit(self, only: set[TP] | None = None) -> None:
        """Commit what is final, once the records that say so are on their topics."""
        self.last_commit = time.monotonic()
        positions = self.offsets.committable(only)
        if not positions:
            return
        self.producer.flush(30)
        if self._produce_error:
            raise DeliveryRecordLost(f"Kafka did not take a delivery record or dead letter ({self._produce_error}); "
                                     "stopping without committing, so the notifications are read again")
        if len(self.producer):
            log.warning("notify: Kafka has not yet taken %d delivery records; commit postponed", len(self.producer))
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()],
                                 asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance under way: committed next time, or re-read and re-sent
            log.info("notify: commit failed (%s); will try again", exc)
            return
        self.offsets.committed(positions)

    # -- rebalancing --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.paused = False  # new assignments start unpaused; _backpressure pauses again if needed

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is final on the partitions we lose and drop the rest: their new owner reads it again."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        try:
            self._commit(only=revoked)
        except DeliveryRecordLost as exc:  # raised again by the loop's next commit; here it would hide its cause
            log.error("notify: not committing the revoked partitions: %s", exc)
        for account, queue in list(self.accounts.items()):
            kept = deque(job for job in queue if job.tp not in revoked)
            for job in queue:
                if job.tp in revoked:
                    job.owned = False
            if not kept:
                del self.accounts[account]
                continue
            head_left = queue[0].tp in revoked
            self.accounts[account] = kept
            if head_left:
                self._schedule(kept[0], time.monotonic())
        self.offsets.forget(revoked)


def run_notify(settings: Settings, loglevel: str = "info") -> None:
    """``supportlens notify``: deliver notifications until SIGINT/SIGTERM."""
    logging.basicConfig(level=getattr(logging, loglevel.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # its debug lines name webhook URLs, which carry tokens
    check_notify_settings(settings)
    require_topics(settings, ("notifications", "deliveries", "dlq"))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    serve_metrics(settings, settings.notify_metrics_port, "notify")
    delivery = NotificationDelivery(settings, process_metrics(), stop)
    log.info("%s: %s → webhook/e-mail, at most %d attempts, %d per account per hour, drills to %s",
             READY_LINE, delivery.topic, settings.notify_max_attempts, settings.notify_max_per_account_per_hour,
             "the drill webhook" if settings.drill_webhook_url else "nowhere")
    try:
        delivery.run()
    except DeliveryRecordLost as exc:
        log.error("notify: %s", exc)
        raise SystemExit(1) from None
    log.info("notify stopped: %s", ", ".join(f"{count} {outcome}" for outcome, count in sorted(delivery.outcomes.items()))
             or "nothing delivered")
