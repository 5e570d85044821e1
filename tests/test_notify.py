"""Notification delivery on real Kafka, to a real webhook receiver (aiohttp) and a real SMTP
server (aiosmtpd), both on loopback: signatures verified by the receiver, retries, dead
letters, drills, rate limits, e-mail in Chinese, and a delivery process killed mid-retry."""

from __future__ import annotations

import email
import gc
import email.policy
import json
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from helpers import settings_env, supportlens_cmd
from mailbox_server import Mailbox, running_mailbox
from supportlens.demo.receiver import WebhookReceiver
from sinks.notifications import READY_LINE, NotificationDelivery
from supportlens.config import Settings
from supportlens.contracts import DeliveryAttempt, Notification, decode, encode
from supportlens.metrics import Metrics
from supportlens.topics import provision

SECRET = "whsec-" + uuid.uuid4().hex
SUBJECT_ZH = "【故障通知】支付服务部分请求失败"
BODY_ZH = "尊敬的客户：\n自 08:00 起，华东地区部分支付请求失败，我们正在处理。\n期间请稍后重试，进展请见状态页。"


# -- a real webhook receiver -------------------------------------------------------------

@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(SECRET) as r:
        yield r


# -- a real SMTP server ------------------------------------------------------------------

@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    with running_mailbox() as (mailbox, port):
        yield mailbox, port


# -- Kafka helpers ---------------------------------------------------------------------------

def delivery_settings(settings: Settings, **overrides: object) -> Settings:
    """The test's settings with a signing secret, short backoffs and no fixed /metrics port."""
    base = dict(notify_webhook_secret=SecretStr(SECRET), notify_backoff_first_s=0.3, notify_backoff_max_s=1.0,
                notify_metrics_port=0)
    return settings.model_copy(update={**base, **overrides})


def notification(account: str, kind: str = "incident_declared", **fields: object) -> Notification:
    base = dict(notification_id=f"inc-7.{account}.{kind}", account_id=account, kind=kind, incident_id="inc-7",
                created_at_us=int(time.time() * 1_000_000), locale="zh-CN", subject=SUBJECT_ZH, body=BODY_ZH)
    return Notification(**{**base, **fields})


def write(settings: Settings, *notifications: Notification) -> None:
    producer = Producer(settings.producer_config())
    for n in notifications:
        producer.produce(settings.topic("notifications"), key=n.account_id.encode(), value=encode(n))
    assert producer.flush(10) == 0


class TopicTail:
    """Everything on one topic from its beginning, read on demand (no consumer group)."""

    def __init__(self, settings: Settings, logical: str) -> None:
        self.consumer = Consumer(settings.kafka_config(**{
            "group.id": f"test-tail-{uuid.uuid4()}", "enable.auto.commit": False, "enable.partition.eof": False}))
        self.consumer.assign([TopicPartition(settings.topic(logical), p, OFFSET_BEGINNING)
                              for p in range(settings.partitions)])
        self.messages: list[Message] = []

    def until(self, done: Callable[[list[Message]], bool], timeout: float = 60.0, what: str = "") -> list[Message]:
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or 'records'}; have {len(self.messages)}")
            self.messages.extend(m for m in self.consumer.consume(100, timeout=0.3) if m.error() is None)
        return self.messages

    def close(self) -> None:
        self.consumer.close()


class Deliveries(TopicTail):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "deliveries")

    def attempts(self, notification_id: str | None = None) -> list[DeliveryAttempt]:
        records = [decode(m.value(), DeliveryAttempt) for m in self.messages]
        if notification_id is not None:
            records = [r for r in records if r.notification_id == notification_id]
        return sorted(records, key=lambda r: (r.at_us, r.attempt))

    def wait_final(self, *notification_ids: str, timeout: float = 60.0) -> None:
        final = {"delivered", "dead_lettered", "rate_limited", "skipped_drill", "no_channel"}
        self.until(lambda _: all(any(a.outcome in final for a in self.attempts(i)) for i in notification_ids),
                   timeout, what=f"final outcomes of {', '.join(notification_ids)}")


@pytest.fixture
def topics(settings: Settings) -> Settings:
    provision(settings)
    return settings


@contextmanager
def delivering(settings: Settings, rng: Callable[[], float] = random.random) -> Iterator[CollectorRegistry]:
    """The delivery loop in a thread of this process, with a metrics registry of its own."""
    registry = CollectorRegistry()
    stop = threading.Event()
    delivery = NotificationDelivery(settings, Metrics(registry), stop, rng=rng)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            delivery.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run, name="notify-loop", daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the delivery loop did not stop"
        del delivery
        gc.collect()  # its Kafka clients sit in a reference cycle (callbacks); let them go before the broker does
    if failure:
        raise failure[0]


def deliveries_counted(registry: CollectorRegistry, channel: str, outcome: str) -> float:
    return registry.get_sample_value("supportlens_notification_deliveries_total",
                                     {"channel": channel, "outcome": outcome}) or 0.0


class NotifyProcess:
    """A real ``supportlens notify`` subprocess, its log in a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(supportlens_cmd("notify"), env=settings_env(settings),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while READY_LINE.encode() not in log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"notify did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def committed_everything(settings: Settings) -> bool:
    """Whether group ``<prefix>notify`` committed every partition of ``notifications`` up to its end."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}notify",
                                                 "enable.auto.commit": False}))
    try:
        topic = settings.topic("notifications")
        committed = consumer.committed([TopicPartition(topic, p) for p in range(settings.partitions)], timeout=10)
        for tp in committed:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
            if high > 0 and tp.offset != high:
                return False
        return True
    finally:
        consumer.close()


# -- the tests ---------------------------------------------------------------------------------

@pytest.mark.kafka
def test_webhook_answering_500_twice_is_delivered_signed_on_attempt_3(topics, receiver, tmp_path) -> None:
    settings = delivery_settings(topics)
    receiver.plan("/hooks/acme", 500, 500, 200)
    n = notification("acme", channel="webhook", to=receiver.url("/hooks/acme"))
    deliveries = Deliveries(settings)
    notify = NotifyProcess(settings, tmp_path / "notify.log")
    try:
        write(settings, n)
        deliveries.wait_final(n.notification_id)
    finally:
        code = notify.stop()
    assert code == 0, notify.log()

    attempts = deliveries.attempts(n.notification_id)
    assert [(a.attempt, a.outcome, a.channel) for a in attempts] == [
        (1, "failed", "webhook"), (2, "failed", "webhook"), (3, "delivered", "webhook")]
    assert [a.detail for a in attempts] == ["HTTP 500 Internal Server Error"] * 2 + ["HTTP 200 OK"]
    assert all(a.account_id == "acme" and not a.drill for a in attempts)

    got = receiver.at("/hooks/acme")
    assert len(got) == 3
    assert all(r.signature_ok for r in got)  # verified by the receiver with verify_signature
    assert [r.headers["X-Supportlens-Attempt"] for r in got] == ["1", "2", "3"]
    assert {r.headers["X-Supportlens-Notification-Id"] for r in got} == {n.notification_id}
    payload = json.loads(got[-1].body)
    assert (payload["subject"], payload["body"], payload["kind"]) == (SUBJECT_ZH, BODY_ZH, "incident_declared")
    assert (payload["notification_id"], payload["account_id"], payload["incident_id"]) == (n.notification_id, "acme", "inc-7")
    assert SECRET not in notify.log() and "/hooks/acme" not in notify.log()
    assert "notify stopped" in notify.log() and committed_everything(settings)
    deliveries.close()


@pytest.mark.kafka
def test_an_endpoint_that_always_fails_is_dead_lettered_and_holds_up_no_other_account(topics, receiver) -> None:
    settings = delivery_settings(topics, notify_max_attempts=3, notify_backoff_first_s=0.5, notify_backoff_max_s=1.0)
    receiver.plan("/down", 503)
    failing = notification("broken-co", channel="webhook", to=receiver.url("/down"))
    fine = notification("fine-co", channel="webhook", to=receiver.url("/up"))
    deliveries, dlq = Deliveries(settings), TopicTail(settings, "dlq")
    # rng 1.0: each backoff is its longest (0.5 s, then 1 s), so the failing one takes ≥ 1.5 s
    with delivering(settings, rng=lambda: 1.0) as registry:
        write(settings, failing, fine)
        deliveries.wait_final(failing.notification_id, fine.notification_id)
        dlq.until(lambda m: len(m) >= 1, what="the dead letter")

    broken = deliveries.attempts(failing.notification_id)
    assert [(a.attempt, a.outcome) for a in broken] == [(1, "failed"), (2, "failed"), (3, "dead_lettered")]
    assert broken[-1].detail == "HTTP 503 Service Unavailable; gave up after 3 attempts, sent to dlq"
    assert broken[1].at_us - broken[0].at_us >= 450_000 and broken[2].at_us - broken[1].at_us >= 950_000
    delivered = deliveries.attempts(fine.notification_id)
    assert [(a.attempt, a.outcome) for a in delivered] == [(1, "delivered")]
    assert delivered[0].at_us < broken[1].at_us  # not queued behind the other account's retries
    assert len(receiver.at("/down")) == 3 and len(receiver.at("/up")) == 1

    [letter] = dlq.messages
    headers = {k: v.decode() for k, v in letter.headers()}
    assert letter.value() == encode(failing) and letter.key() == b"broken-co"  # the original, replayable
    assert headers["source_topic"] == settings.topic("notifications")
    assert headers["reason"].startswith(f"notification {failing.notification_id} not delivered: HTTP 503")
    assert int(headers["source_partition"]) >= 0 and int(headers["source_offset"]) >= 0

    assert deliveries_counted(registry, "webhook", "failed") == 2
    assert deliveries_counted(registry, "webhook", "dead_lettered") == 1
    assert deliveries_counted(registry, "webhook", "delivered") == 1
    assert committed_everything(settings)
    deliveries.close()
    dlq.close()


@pytest.mark.kafka
def test_email_reaches_a_real_smtp_server_with_chinese_intact(topics, smtp) -> None:
    mailbox, port = smtp
    settings = delivery_settings(topics, smtp_host="127.0.0.1", smtp_port=port, smtp_from="support@supportlens.example")
    n = notification("mail-co", channel="email", to="ops@mail-co.example")
    deliveries = Deliveries(settings)
    with delivering(settings) as registry:
        write(settings, n)
        deliveries.wait_final(n.notification_id)

    [attempt] = deliveries.attempts(n.notification_id)
    assert (attempt.outcome, attempt.channel, attempt.detail) == ("delivered", "email", "SMTP 250 2.0.0 Ok: queued as T1")
    [(sender, recipients, raw)] = mailbox.mails
    assert (sender, recipients) == ("support@supportlens.example", ["ops@mail-co.example"])
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["Subject"] == SUBJECT_ZH
    assert mail.get_content().rstrip("\n") == BODY_ZH
    assert mail["X-Supportlens-Notification-Id"] == n.notification_id
    assert mail["Message-ID"] == f"<{n.notification_id}@supportlens.example>"
    assert deliveries_counted(registry, "email", "delivered") == 1
    deliveries.close()


@pytest.mark.kafka
def test_drill_notifications_reach_only_the_drill_webhook(topics, receiver, smtp, tmp_path) -> None:
    mailbox, port = smtp
    settings = delivery_settings(topics, drill_webhook_url=receiver.url("/drills"), smtp_port=port)
    by_hook = notification("vip-a", channel="webhook", to=receiver.url("/customer/vip-a"), drill=True)
    by_mail = notification("vip-b", channel="email", to="ops@vip-b.example", drill=True)
    deliveries = Deliveries(settings)
    notify = NotifyProcess(settings, tmp_path / "notify.log")
    try:
        write(settings, by_hook, by_mail)
        deliveries.wait_final(by_hook.notification_id, by_mail.notification_id)
    finally:
        assert notify.stop() == 0, notify.log()

    assert receiver.at("/customer/vip-a") == [] and mailbox.mails == []  # the customers got nothing
    drills = receiver.at("/drills")
    assert len(drills) == 2 and all(r.signature_ok for r in drills)
    assert {json.loads(r.body)["notification_id"] for r in drills} == {by_hook.notification_id, by_mail.notification_id}
    assert all(json.loads(r.body)["drill"] is True for r in drills)
    for n in (by_hook, by_mail):
        [attempt] = deliveries.attempts(n.notification_id)
        assert (attempt.outcome, attempt.channel, attempt.drill) == ("delivered", "webhook", True)
        assert attempt.detail == "drill channel: HTTP 200 OK"
    deliveries.close()


@pytest.mark.kafka
def test_rate_limit_and_notifications_that_are_not_sent(topics, receiver) -> None:
    # no drill webhook configured: a drill notification is sent nowhere
    settings = delivery_settings(topics, notify_max_per_account_per_hour=2)
    chatty = [notification("chatty", kind="misuse_advice", notification_id=f"advice-{i}", channel="webhook",
                           to=receiver.url("/chatty")) for i in range(4)]
    other = notification("quiet", channel="webhook", to=receiver.url("/quiet"))
    drill = notification("drilled", channel="webhook", to=receiver.url("/drilled"), drill=True)
    silent = notification("silent", channel="none")
    deliveries = Deliveries(settings)
    with delivering(settings) as registry:
        write(settings, *chatty, other, drill, silent)
        ids = [n.notification_id for n in (*chatty, other, drill, silent)]
        deliveries.wait_final(*ids)

    outcomes = {i: [a.outcome for a in deliveries.attempts(i)] for i in ids}
    assert outcomes == {
        "advice-0": ["delivered"], "advice-1": ["delivered"], "advice-2": ["rate_limited"], "advice-3": ["rate_limited"],
        other.notification_id: ["delivered"], drill.notification_id: ["skipped_drill"],
        silent.notification_id: ["no_channel"],
    }
    assert "over 2 notifications" in deliveries.attempts("advice-3")[0].detail
    got = [json.loads(r.body)["notification_id"] for r in receiver.at("/chatty")]
    assert got == ["advice-0", "advice-1"]  # in the order written, the rest not sent
    assert receiver.at("/drilled") == [] and len(receiver.at("/quiet")) == 1
    assert deliveries_counted(registry, "webhook", "rate_limited") == 2
    assert deliveries_counted(registry, "webhook", "skipped_drill") == 1
    assert deliveries_counted(registry, "none", "no_channel") == 1
    deliveries.close()


@pytest.mark.kafka
def test_a_notify_process_killed_while_retrying_loses_nothing(topics, receiver, tmp_path) -> None:
    # a short session: the killed member's partitions go to the restarted one within seconds
    settings = delivery_settings(topics, notify_max_attempts=100, kafka_client={"session.timeout.ms": "6000"})
    receiver.plan("/flaky", 500)
    n = notification("acme", channel="webhook", to=receiver.url("/flaky"))
    deliveries = Deliveries(settings)
    first = NotifyProcess(settings, tmp_path / "first.log")
    try:
        write(settings, n)
        # retrying for a while: past several commit rounds (1 s each), none of which may commit it
        deliveries.until(lambda _: _retried_for(deliveries.attempts(n.notification_id), seconds=3.0),
                         what="3 s of failed attempts")
    finally:
        first.kill()
    assert not any(a.outcome == "delivered" for a in deliveries.attempts(n.notification_id))

    receiver.plan("/flaky", 200)  # the endpoint is back
    second = NotifyProcess(settings, tmp_path / "second.log")
    try:
        deliveries.wait_final(n.notification_id, timeout=90)
    finally:
        assert second.stop() == 0, second.log()
    assert deliveries.attempts(n.notification_id)[-1].outcome == "delivered"
    assert json.loads(receiver.at("/flaky")[-1].body)["notification_id"] == n.notification_id
    assert committed_everything(settings)
    deliveries.close()


def _retried_for(attempts: list[DeliveryAttempt], seconds: float) -> bool:
    return len(attempts) >= 2 and attempts[-1].at_us - attempts[0].at_us >= seconds * 1_000_000
