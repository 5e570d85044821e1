"""Notification delivery's pure parts: signatures, backoff, rate limit, routing, what an answer
means, what is sent, and which offsets may be committed. No network, no Kafka."""

from __future__ import annotations

import email
import email.policy
import json
import random
import time
from pathlib import Path

import pytest

from helpers import spy_on_compare_digest
from sinks.delivery_policy import (
    AccountRateLimiter,
    RetryPolicy,
    SendResult,
    after_attempt,
    backoff_delay,
    http_result,
    route,
    smtp_result,
)
from sinks.notifications import PendingOffsets, email_message, message_id, webhook_body, webhook_headers
from sinks.signing import signature_header, verify_signature
from supportlens.contracts import Notification

SECRET = "whsec-test-0123456789"
BODY = '{"subject":"支付服务中断","notification_id":"n-1"}'.encode()
T = 1_750_000_000


def notification(**fields) -> Notification:
    base = dict(notification_id="inc-1.acct-1.incident_declared", account_id="acct-1", kind="incident_declared",
                created_at_us=1_750_000_000_123_456, incident_id="inc-1", channel="webhook",
                to="https://hooks.example.com/t0k3n", locale="zh-CN", subject="支付服务中断",
                body="我们正在处理支付失败的问题。\n请稍后重试。")
    return Notification(**{**base, **fields})


# -- signatures -------------------------------------------------------------------------

def test_signature_round_trip() -> None:
    header = signature_header(SECRET, T, BODY)
    assert header.startswith(f"t={T},v1=") and len(header.split("v1=")[1]) == 64
    assert verify_signature(SECRET, header, BODY, now=T + 5)
    assert verify_signature(SECRET.encode(), header, BODY, now=T - 5)  # bytes secret, receiver clock a bit behind


def test_signatures_are_compared_in_constant_time_never_with_equality(monkeypatch) -> None:
    compared = spy_on_compare_digest(monkeypatch)
    header = signature_header(SECRET, T, BODY)
    wrong = header[:-1] + ("0" if header[-1] != "0" else "1")
    assert verify_signature(SECRET, header, BODY, now=T) and not verify_signature(SECRET, wrong, BODY, now=T)
    assert len(compared) == 2 and compared[1][1] == wrong.split("v1=")[1].encode()


@pytest.mark.parametrize("case", ["body", "timestamp", "secret", "old", "future", "no_v1", "no_t", "garbage", "empty"])
def test_signature_rejects(case: str) -> None:
    header = signature_header(SECRET, T, BODY)
    secret, body, now = SECRET, BODY, T
    if case == "body":
        body = BODY.replace(b"n-1", b"n-2")
    elif case == "timestamp":  # a replay with a fresh timestamp but the old signature
        header = header.replace(f"t={T}", f"t={T + 60}")
        now = T + 60
    elif case == "secret":
        secret = SECRET + "x"
    elif case == "old":
        now = T + 301
    elif case == "future":
        now = T - 301
    elif case == "no_v1":
        header = f"t={T}"
    elif case == "no_t":
        header = header.split(",", 1)[1]
    elif case == "garbage":
        header = "t=１２３,v1=zz"  # full-width digits are digits to str.isdigit, not to us
    elif case == "empty":
        header = ""
    assert not verify_signature(secret, header, body, now=now)


def test_signature_tolerance_boundary_and_rotation() -> None:
    header = signature_header(SECRET, T, BODY)
    assert verify_signature(SECRET, header, BODY, now=T + 300)
    assert not verify_signature(SECRET, header, BODY, now=T + 300.5)
    assert verify_signature(SECRET, header, BODY, now=T + 30, tolerance_s=30)
    # a receiver rotating its secret accepts a header carrying the old and the new signature
    rotated = signature_header("old-secret", T, BODY) + "," + signature_header(SECRET, T, BODY).split(",")[1]
    assert verify_signature(SECRET, rotated, BODY, now=T)
    assert verify_signature("old-secret", rotated, BODY, now=T)


def test_readme_verification_snippet_accepts_what_we_sign() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Verifying a webhook signature", 1)[1]
    namespace: dict = {}
    exec(section.split("```python\n", 1)[1].split("```", 1)[0], namespace)  # noqa: S102 - our own README
    verify = namespace["verify"]
    now = int(time.time())
    header = signature_header(SECRET, now, BODY)
    assert verify(SECRET.encode(), header, BODY)
    assert not verify(SECRET.encode(), header, BODY + b" ")
    assert not verify(b"another secret", header, BODY)
    assert not verify(SECRET.encode(), signature_header(SECRET, now - 301, BODY), BODY)
    assert not verify(SECRET.encode(), header.replace(f"t={now}", f"t={now + 1}"), BODY)
    assert not verify(SECRET.encode(), "t=１２３,v1=ab", BODY)


def test_webhook_headers_sign_the_exact_body() -> None:
    n = notification()
    body = webhook_body(n)
    headers = webhook_headers(SECRET, n, body, attempt=2, now_s=T)
    assert headers["X-Supportlens-Notification-Id"] == n.notification_id
    assert headers["X-Supportlens-Attempt"] == "2"
    assert verify_signature(SECRET, headers["X-Supportlens-Signature"], body, now=T)
    payload = json.loads(body)
    assert payload == {
        "notification_id": n.notification_id, "account_id": "acct-1", "kind": "incident_declared",
        "incident_id": "inc-1", "locale": "zh-CN", "subject": "支付服务中断", "body": n.body,
        "created_at": "2025-06-15T15:06:40.123456Z", "drill": False,
    }
    assert "支付".encode() in body  # UTF-8 as is, not \u escapes
    assert b"t0k3n" not in body  # the target address is not part of what is sent


# -- backoff and what follows an attempt -------------------------------------------------

def test_backoff_full_jitter_bounds() -> None:
    assert backoff_delay(1, 2.0, 300.0, rng=lambda: 0.0) == 0.0
    ceilings = [backoff_delay(n, 2.0, 300.0, rng=lambda: 1.0) for n in range(1, 11)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff_delay(10_000, 2.0, 300.0, rng=lambda: 1.0) == 300.0  # no overflow however many failures
    rng = random.Random(7).random
    for failures in range(1, 12):
        delays = [backoff_delay(failures, 0.5, 10.0, rng) for _ in range(200)]
        ceiling = min(10.0, 0.5 * 2 ** (failures - 1))
        assert all(0 <= d < ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling  # spread over the whole range


def test_after_attempt() -> None:
    policy = RetryPolicy(max_attempts=3, first_s=1.0, max_s=60.0)
    half = lambda: 0.5  # noqa: E731
    assert after_attempt(SendResult(True, "HTTP 200"), 3, policy, half).outcome == "delivered"
    first = after_attempt(SendResult(False, "HTTP 500"), 1, policy, half)
    assert (first.outcome, first.retry_in_s) == ("failed", 0.5)
    assert after_attempt(SendResult(False, "HTTP 500"), 2, policy, half).retry_in_s == 1.0
    assert after_attempt(SendResult(False, "HTTP 500"), 3, policy, half).outcome == "dead_lettered"
    assert after_attempt(SendResult(False, "HTTP 404", permanent=True), 1, policy, half).outcome == "dead_lettered"
    # the receiver's Retry-After lengthens the wait, but never past the longest backoff
    assert after_attempt(SendResult(False, "HTTP 429", retry_after_s=20), 1, policy, half).retry_in_s == 20
    assert after_attempt(SendResult(False, "HTTP 429", retry_after_s=3600), 1, policy, half).retry_in_s == 60


@pytest.mark.parametrize(("status", "ok", "permanent"), [
    (200, True, False), (204, True, False), (301, False, True), (400, False, True), (401, False, True),
    (404, False, True), (408, False, False), (429, False, False), (500, False, False), (503, False, False),
])
def test_http_result(status: int, ok: bool, permanent: bool) -> None:
    result = http_result(status, "Reason")
    assert (result.ok, result.permanent, result.detail) == (ok, permanent, f"HTTP {status} Reason")


def test_http_and_smtp_details() -> None:
    assert http_result(429, "Too Many Requests", "17").retry_after_s == 17
    assert http_result(429, "", "Wed, 21 Oct 2015 07:28:00 GMT").retry_after_s is None
    assert http_result(500, "", "17").retry_after_s is None
    assert smtp_result(250, "2.0.0 Ok: queued") == SendResult(True, "SMTP 250 2.0.0 Ok: queued")
    assert smtp_result(451, "try later").permanent is False
    assert smtp_result(550, "no such user").permanent is True


# -- rate limit ---------------------------------------------------------------------------

def test_rate_limiter_sliding_window() -> None:
    limiter = AccountRateLimiter(limit=3, window_s=3600)
    assert [limiter.admit("a", f"n{i}", now=10.0 * i) for i in range(4)] == [True, True, True, False]
    assert limiter.admit("b", "n0", now=30.0)  # accounts are counted apart
    assert limiter.admit("a", "n1", now=40.0)  # the same notification read again: admitted, not counted again
    assert not limiter.admit("a", "n4", now=3599.0)
    assert limiter.admit("a", "n5", now=3600.0)  # the first (t=0) left the window
    assert not limiter.admit("a", "n6", now=3605.0)
    assert limiter.admit("a", "n7", now=3610.0)  # t=10 left too


# -- routing --------------------------------------------------------------------------------

def test_route() -> None:
    plain = route(notification(), drill_webhook_url="https://drills.internal/hook")
    assert (plain.action, plain.channel, plain.target, plain.to_drill_channel) == (
        "send", "webhook", "https://hooks.example.com/t0k3n", False)
    mail = route(notification(channel="email", to="ops@example.com"), "")
    assert (mail.action, mail.channel, mail.target) == ("send", "email", "ops@example.com")

    drill = route(notification(drill=True, channel="email", to="ops@example.com"), "https://drills.internal/hook")
    assert (drill.action, drill.channel, drill.target, drill.to_drill_channel) == (
        "send", "webhook", "https://drills.internal/hook", True)
    no_drill_channel = route(notification(drill=True), "")
    assert (no_drill_channel.action, no_drill_channel.outcome) == ("skip", "skipped_drill")
    assert "t0k3n" not in no_drill_channel.detail

    assert route(notification(channel="none"), "").outcome == "no_channel"
    assert route(notification(channel="email", to="  "), "").outcome == "no_channel"


# -- e-mail ------------------------------------------------------------------------------------

def test_email_message_keeps_chinese_and_the_id() -> None:
    n = notification(channel="email", to="ops@example.com")
    raw = email_message(n, "alerts@supportlens.example", "ops@example.com", now_s=T).as_bytes()
    assert raw.isascii()  # 7-bit clean: RFC 2047 subject, base64 body
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "支付服务中断"
    assert parsed.get_content() == n.body + "\n"
    assert parsed["X-Supportlens-Notification-Id"] == n.notification_id
    assert parsed["Message-ID"] == "<inc-1.acct-1.incident_declared@supportlens.example>"
    assert parsed["Content-Language"] == "zh-CN"
    # an id that is no valid Message-ID part is hashed, the same way each time
    odd = message_id("a@b<c>", "x@y")
    assert odd == message_id("a@b<c>", "x@y") and odd.endswith("@y>") and "<c>" not in odd


# -- offsets -------------------------------------------------------------------------------------

def test_pending_offsets_commit_up_to_lowest_open() -> None:
    offsets = PendingOffsets()
    tp, other = ("notifications", 0), ("notifications", 1)
    for offset in (5, 6, 7):
        offsets.read(tp, offset)
    offsets.read(other, 0)
    offsets.done(tp, 6)
    offsets.done(tp, 7)
    offsets.done(other, 0)
    assert offsets.committable() == {tp: 5, other: 1}  # 5 still retrying holds its partition, not the other
    offsets.committed(offsets.committable())
    assert offsets.committable() == {}
    offsets.done(tp, 5)
    assert offsets.committable() == {tp: 8}
    assert offsets.committable(only={other}) == {}
    assert len(offsets) == 0
    offsets.forget({tp})
    assert offsets.committable() == {}
