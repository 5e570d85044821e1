"""API keys per client app and per-app rate limits at the gateway.

The token bucket and the access decision run on a clock the tests move by hand, so nothing
here waits for time to pass; the HTTP tests use aiohttp's test client against the real
application; one test runs the real ``supportlens gateway`` command on the session's Kafka.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from helpers import free_port, settings_env, spy_on_compare_digest, supportlens_cmd
from supportlens.config import load_settings
from supportlens.errors import UserError
from supportlens.gateway.access import (
    KEY_HEADER, UNKNOWN_APP, AccessControl, Admitted, ClientApp, Refused, key_sha256, load_client_apps, new_key,
    presented_key,
)
from supportlens.gateway.app import build_app
from supportlens.gateway.ratelimit import RateLimit, RateLimiter, TokenBucket, retry_after_s
from supportlens.gateway.status import ReportBook
from supportlens.metrics import Metrics
from test_gateway_http import CONSENTED_APP, MemorySink, call, otlp_request, otlp_span, post_json

IOS_OLD, IOS_NEW, ANDROID = new_key(), new_key(), new_key()
REPORT = {"user_id": "u1", "locale": "en"}


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SUPPORTLENS_")]:
        monkeypatch.delenv(key)


# --- the token bucket --------------------------------------------------------------------


def test_a_bucket_lets_a_burst_through_then_one_request_per_refilled_token():
    bucket = TokenBucket(RateLimit(per_s=2, burst=3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # the next token is half a second away
    assert bucket.take(0.25) == pytest.approx(0.25)  # refused requests take nothing
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)


def test_a_bucket_refills_up_to_its_burst_and_no_further():
    bucket = TokenBucket(RateLimit(per_s=10, burst=5), now=0.0)
    for _ in range(5):
        bucket.take(0.0)
    assert bucket.take(3600.0) == 0.0  # an hour idle: full again, but only to 5
    assert [bucket.take(3600.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(3600.0) > 0


def test_a_clock_that_steps_back_refills_nothing():
    bucket = TokenBucket(RateLimit(per_s=1, burst=1), now=100.0)
    assert bucket.take(100.0) == 0.0
    assert bucket.take(50.0) == pytest.approx(1.0)
    assert bucket.take(50.5) == pytest.approx(0.5)


def test_rate_zero_means_no_limit():
    bucket = TokenBucket(RateLimit(per_s=0, burst=1), now=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(10_000))


def test_each_app_has_its_own_bucket():
    clock = FakeClock()
    limiter = RateLimiter({"ios": RateLimit(1, 2), "android": RateLimit(1, 2)}, clock)
    assert [limiter.admit("ios") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert [limiter.admit("android") for _ in range(2)] == [0.0, 0.0]  # ios used up its own tokens only
    clock.now += 1.0
    assert limiter.admit("ios") == 0.0


@pytest.mark.parametrize("wait_s, header", [(0.001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (2.0, 2), (59.2, 60)])
def test_retry_after_is_whole_seconds_rounded_up(wait_s, header):
    assert retry_after_s(wait_s) == header


@pytest.mark.parametrize("per_s, burst", [(-1, 10), (1, 0)])
def test_impossible_limits_are_refused(per_s, burst):
    with pytest.raises(ValueError):
        RateLimit(per_s, burst)


# --- who a request is from ---------------------------------------------------------------


def _apps(ios: RateLimit = RateLimit(100, 100), android: RateLimit = RateLimit(100, 100)) -> list[ClientApp]:
    return [ClientApp("ios", (key_sha256(IOS_OLD), key_sha256(IOS_NEW)), ios),
            ClientApp("android", (key_sha256(ANDROID),), android)]


@pytest.mark.parametrize("authorization, key_header, expected", [
    (f"Bearer {IOS_OLD}", None, IOS_OLD),
    (f"bearer   {IOS_OLD} ", None, IOS_OLD),  # the scheme is case-insensitive (RFC 9110)
    (None, f" {IOS_OLD} ", IOS_OLD),
    ("Basic dXNlcjpwdw==", IOS_OLD, IOS_OLD),  # a proxy in front may need Authorization for itself
    (f"Bearer {ANDROID}", IOS_OLD, IOS_OLD),
])
def test_the_key_comes_from_either_header(authorization, key_header, expected):
    assert presented_key(authorization, key_header) == expected


@pytest.mark.parametrize("authorization, key_header, message", [
    (None, None, "this gateway needs an API key: send it as `Authorization: Bearer <key>` or `X-Supportlens-Key"),
    ("Bearer ", "  ", "this gateway needs an API key"),
    (IOS_OLD, None, "the Authorization header holds no Bearer token"),  # the key without its scheme
    ("Basic dXNlcjpwdw==", None, "the Authorization header holds no Bearer token"),
])
def test_a_request_without_a_usable_key_is_told_how_to_send_one(authorization, key_header, message):
    refused = presented_key(authorization, key_header)
    assert isinstance(refused, Refused)
    assert (refused.status, refused.reason, refused.app) == (401, "unauthenticated", UNKNOWN_APP)
    assert message in refused.message and IOS_OLD not in refused.message


def test_keys_are_told_apart_by_their_hash_and_both_keys_of_an_app_work():
    access = AccessControl(_apps(), FakeClock())
    assert access.check(f"Bearer {IOS_OLD}", None) == Admitted("ios")
    assert access.check(None, IOS_NEW) == Admitted("ios")
    assert access.check(f"Bearer {ANDROID}", None) == Admitted("android")
    wrong = access.check(f"Bearer {IOS_OLD}x", None)
    assert isinstance(wrong, Refused) and (wrong.status, wrong.app) == (401, UNKNOWN_APP)
    assert "not valid here" in wrong.message


def test_every_known_hash_is_compared_in_constant_time_whichever_matches(monkeypatch):
    compared = spy_on_compare_digest(monkeypatch)
    access = AccessControl(_apps(), FakeClock())
    for key in (IOS_OLD, ANDROID, "nobody's key"):
        compared.clear()
        access.identify(key)
        assert len(compared) == 3  # no early exit on a match
        assert {b for _, b in compared} == {hashlib.sha256(key.encode()).hexdigest()}  # hashes, never the key


def test_an_app_over_its_rate_is_refused_with_when_to_retry_and_others_are_not():
    clock = FakeClock()
    access = AccessControl(_apps(ios=RateLimit(per_s=0.5, burst=2)), clock)
    assert [access.check(None, IOS_OLD) for _ in range(2)] == [Admitted("ios")] * 2
    refused = access.check(None, IOS_NEW)  # both keys of an app share its bucket
    assert isinstance(refused, Refused)
    assert (refused.status, refused.reason, refused.app, refused.retry_after_s) == (429, "rate_limited", "ios", 2)
    assert refused.message == "app ios sends more than its limit of 0.5 requests/s (bursts of 2); retry in 2 s"
    assert access.check(None, ANDROID) == Admitted("android")
    clock.now += 1.5
    assert access.check(None, IOS_OLD).retry_after_s == 1  # type: ignore[union-attr]
    clock.now += 0.5
    assert access.check(None, IOS_OLD) == Admitted("ios")


def test_without_a_keys_file_everyone_is_admitted_without_limit():
    access = AccessControl.from_settings(load_settings())
    assert access.open
    assert all(access.check(None, None) == Admitted("") for _ in range(5000))


# --- the keys file -----------------------------------------------------------------------


def _keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway-keys.toml"
    path.write_text(text)
    return path


IOS_HASH, ANDROID_HASH = key_sha256(IOS_OLD), key_sha256(ANDROID)


def test_the_keys_file_names_apps_their_hashes_and_limits(tmp_path, monkeypatch):
    path = _keys_file(tmp_path, f"""
# hashes only: this file is no secret
[apps.ios]
key_sha256 = ["{IOS_HASH}", "{key_sha256(IOS_NEW).upper()}"]
rate_per_s = 50
burst = 200

[apps.android]
key_sha256 = "{ANDROID_HASH}"

[apps.backend-collector]
key_sha256 = ["{key_sha256('collector key')}"]
rate_per_s = 0
""")
    monkeypatch.setenv("SUPPORTLENS_GATEWAY_API_KEYS_FILE", str(path))
    monkeypatch.setenv("SUPPORTLENS_GATEWAY_RATE_PER_S", "20")
    access = AccessControl.from_settings(load_settings(gateway_rate_burst=40))
    assert access.apps == (
        ClientApp("ios", (IOS_HASH, key_sha256(IOS_NEW)), RateLimit(50, 200)),
        ClientApp("android", (ANDROID_HASH,), RateLimit(20, 40)),  # the settings' defaults
        ClientApp("backend-collector", (key_sha256("collector key"),), RateLimit(0, 40)),
    )
    assert access.check(None, IOS_NEW) == Admitted("ios")  # an upper-case hash still matches


@pytest.mark.parametrize("text, problem", [
    ("[apps.ios\nkey_sha256 = 1", "is not valid TOML: "),
    ("", "no app listed: add an [apps.<name>] table"),
    (f'key_sha256 = "{IOS_HASH}"', "unknown entry 'key_sha256': the file holds [apps.<name>] tables only"),
    ('[apps]\nios = "x"', "[apps.ios]: must be a table with key_sha256"),
    ("\n[apps.ios]\nrate_per_s = 5", "line 2, [apps.ios]: key_sha256 must list the SHA-256 of at least one key"),
    ("[apps.ios]\nkey_sha256 = []", "line 1, [apps.ios]: key_sha256 must list"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}", "abc123"]',
     "line 1, [apps.ios]: key_sha256[1] is not a SHA-256 digest (64 hex characters)"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_OLD}"]',
     "line 1, [apps.ios]: key_sha256[0] holds a key itself, not its hash: remove it, treat that key as leaked"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\nkey = "{IOS_OLD}"',
     "line 1, [apps.ios]: unknown entry 'key'; an app has key_sha256, rate_per_s, burst"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\n\n[apps."android"]\nkey_sha256 = ["{IOS_HASH.upper()}"]',
     'line 4, [apps.android]: key_sha256[0] is already a key of app ios: a key belongs to one app, once'),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}", "{IOS_HASH}"]', "key_sha256[1] is listed twice"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\nrate_per_s = -1', "[apps.ios]: rate_per_s must be a number"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\nrate_per_s = nan', "[apps.ios]: rate_per_s must be a number"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\nrate_per_s = "fast"', "[apps.ios]: rate_per_s must be a number"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\nburst = 0', "[apps.ios]: burst must be a whole number"),
    (f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]\nburst = 2.5', "[apps.ios]: burst must be a whole number"),
    (f'[apps."i os"]\nkey_sha256 = ["{IOS_HASH}"]', "line 1, [apps.i os]: an app name has 1 to 64 letters"),
])
def test_a_bad_keys_file_is_a_user_error_naming_the_file_the_app_and_the_problem(tmp_path, text, problem):
    path = _keys_file(tmp_path, text)
    with pytest.raises(UserError) as caught:
        AccessControl.from_settings(load_settings(gateway_api_keys_file=path))
    assert caught.value.message.startswith(f"gateway API keys file {path}")
    assert problem in caught.value.message, caught.value.message
    assert IOS_OLD not in caught.value.message  # a key pasted in the wrong place is never repeated
    assert "supportlens gateway-key new" in caught.value.hint


def test_a_missing_keys_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="gateway API keys file .*nowhere.toml does not exist"):
        load_client_apps(tmp_path / "nowhere.toml", RateLimit(1, 1))


def test_build_app_refuses_a_bad_keys_file_before_anything_listens(tmp_path):
    settings = load_settings(gateway_api_keys_file=_keys_file(tmp_path, "[apps.ios]\n"), state_dir=tmp_path)
    with pytest.raises(UserError, match=r"line 1, \[apps.ios\]: key_sha256 must list"):
        build_app(settings, MemorySink(), ReportBook())


def test_the_settings_name_the_file_never_a_key(tmp_path):
    path = _keys_file(tmp_path, f'[apps.ios]\nkey_sha256 = ["{IOS_HASH}"]')
    settings = load_settings(gateway_api_keys_file=path)
    assert settings.public_view()["gateway_api_keys_file"] == str(path)
    assert settings.as_env()["SUPPORTLENS_GATEWAY_API_KEYS_FILE"] == str(path)


# --- over HTTP ---------------------------------------------------------------------------


class Keyed:
    """The gateway application with apps ios and android, a hand-moved clock and its own metrics."""

    def __init__(self, tmp_path: Path, ios: RateLimit = RateLimit(100, 100), android: RateLimit = RateLimit(100, 100),
                 access: AccessControl | None = None) -> None:
        self.clock = FakeClock()
        self.sink = MemorySink()
        self.registry = CollectorRegistry()
        settings = load_settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="t.", state_dir=tmp_path)
        self.app = build_app(settings, self.sink, ReportBook(), access=access or AccessControl(
            _apps(ios, android), self.clock), metrics=Metrics(self.registry))

    def refused(self, app: str, reason: str) -> float | None:
        return self.registry.get_sample_value("supportlens_gateway_requests_refused_total",
                                              {"app": app, "reason": reason})

    def run(self, steps: Callable[[TestClient], Awaitable[None]]) -> None:
        async def main() -> None:
            async with TestClient(TestServer(self.app)) as client:
                await steps(client)

        asyncio.run(main())


async def _post(client: TestClient, path: str, body: object, **headers: str) -> tuple[int, dict, object]:
    async with client.post(path, data=msgspec.json.encode(body),
                           headers={"Content-Type": "application/json", **headers}) as response:
        return response.status, dict(response.headers), await response.json()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _key(key: str) -> dict[str, str]:
    return {KEY_HEADER: key}


def test_a_request_without_a_key_or_with_a_wrong_one_is_refused_401(tmp_path):
    gateway = Keyed(tmp_path)

    async def steps(client: TestClient) -> None:
        for headers in ({}, _bearer("slk_not-a-key-of-anyone"), _key(IOS_OLD[:-1]), {"Authorization": IOS_OLD}):
            status, answer_headers, body = await _post(client, "/v1/reports", REPORT, **headers)
            assert status == 401, body
            assert answer_headers["WWW-Authenticate"].startswith("Bearer")
            assert answer_headers["Content-Type"].startswith("application/json")
            assert set(body) == {"error"} and IOS_OLD not in body["error"]
        status, _, body = await _post(client, "/v1/nowhere", {})  # no key: which endpoints exist is not told
        assert (status, body["error"]) == (401, "this gateway needs an API key: send it as `Authorization: Bearer "
                                                "<key>` or `X-Supportlens-Key: <key>`")

    gateway.run(steps)
    assert gateway.sink.records == []
    assert gateway.refused(UNKNOWN_APP, "unauthenticated") == 5
    assert gateway.refused("ios", "rate_limited") == 0  # every series exists from the start


def test_the_right_key_in_either_header_is_accepted_and_both_keys_of_an_app_work(tmp_path):
    gateway = Keyed(tmp_path)

    async def steps(client: TestClient) -> None:
        for headers in (_bearer(IOS_OLD), _key(IOS_OLD), _bearer(IOS_NEW), _key(ANDROID)):
            status, _, body = await _post(client, "/v1/reports", REPORT, **headers)
            assert status == 202 and body["report_id"], body
        status, _, body = await _post(client, "/v1/traces", otlp_request([otlp_span("req-1")], **CONSENTED_APP),
                                      **_bearer(ANDROID))
        assert (status, body) == (200, {})
        async with client.get("/v1/reports/unknown-report", headers=_key(IOS_NEW)) as response:
            assert response.status == 404  # past the key check: the endpoint answers

    gateway.run(steps)
    assert [record.topic for record in gateway.sink.records] == ["fault-reports"] * 4 + ["client-spans"]


def test_an_app_over_its_burst_gets_429_with_retry_after_and_the_other_app_does_not(tmp_path, caplog):
    gateway = Keyed(tmp_path, ios=RateLimit(per_s=0.25, burst=3))

    async def steps(client: TestClient) -> None:
        statuses = [(await _post(client, "/v1/reports", REPORT, **_bearer(IOS_OLD)))[0] for _ in range(3)]
        assert statuses == [202, 202, 202]
        status, headers, body = await _post(client, "/v1/reports", REPORT, **_key(IOS_NEW))
        assert (status, headers["Retry-After"]) == (429, "4")  # one token every 4 s
        assert body == {"error": "app ios sends more than its limit of 0.25 requests/s (bursts of 3); retry in 4 s"}
        status, headers, _ = await _post(client, "/v1/behaviour", [], **_bearer(IOS_OLD))
        assert (status, headers["Retry-After"]) == (429, "4")
        assert (await _post(client, "/v1/reports", REPORT, **_bearer(ANDROID)))[0] == 202
        gateway.clock.now += 4
        assert (await _post(client, "/v1/reports", REPORT, **_bearer(IOS_OLD)))[0] == 202

    with caplog.at_level(logging.DEBUG, logger="supportlens"):
        gateway.run(steps)
    assert len(gateway.sink.on("fault-reports")) == 5
    assert gateway.refused("ios", "rate_limited") == 2
    assert gateway.refused("android", "rate_limited") == 0
    logged = [r.getMessage() for r in caplog.records]
    assert sum("app ios sends more than its limit" in m for m in logged) == 1  # once per episode, not per request
    assert any("app ios is under its rate limit again; 2 requests were refused with 429" in m for m in logged)
    assert not any(key in m for m in logged for key in (IOS_OLD, IOS_NEW, ANDROID))


def test_health_and_metrics_need_no_key(tmp_path):
    gateway = Keyed(tmp_path)

    async def steps(client: TestClient) -> None:
        async with client.get("/healthz") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})
        async with client.get("/metrics") as response:
            assert response.status == 200

    gateway.run(steps)


def test_refusals_are_logged_without_the_key(tmp_path, caplog):
    gateway = Keyed(tmp_path)

    async def steps(client: TestClient) -> None:
        assert (await _post(client, "/v1/reports", REPORT, **_bearer(IOS_OLD + "x")))[0] == 401
        assert (await _post(client, "/v1/reports", REPORT, **{"Authorization": IOS_OLD}))[0] == 401
        assert (await _post(client, "/v1/reports", REPORT, **_bearer(IOS_OLD)))[0] == 202

    with caplog.at_level(logging.DEBUG):
        gateway.run(steps)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused POST /v1/reports")]
    assert len(refusals) == 2
    assert not any(IOS_OLD in r.getMessage() for r in caplog.records)


def test_without_a_keys_file_the_gateway_stays_open(tmp_path):
    settings = load_settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="t.", state_dir=tmp_path)
    sink = MemorySink()
    app = build_app(settings, sink, ReportBook(), metrics=Metrics(CollectorRegistry()))

    async def main() -> None:
        async with TestClient(TestServer(app)) as client:
            for _ in range(50):
                assert (await _post(client, "/v1/reports", REPORT))[0] == 202

    asyncio.run(main())
    assert len(sink.records) == 50


# --- the commands ------------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    return subprocess.run(supportlens_cmd(*args), env={**base, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_gateway_key_new_prints_a_fresh_key_and_the_hash_the_gateway_accepts_it_by(tmp_path):
    from opentelemetry.util.re import parse_env_headers

    done = _run("gateway-key", "new", "--app", "ios", "--json")
    assert done.returncode == 0, done.stderr
    made = msgspec.json.decode(done.stdout)
    assert made["app"] == "ios" and made["key"].startswith("slk_") and len(made["key"]) >= 40
    assert made["key_sha256"] == hashlib.sha256(made["key"].encode()).hexdigest()
    path = _keys_file(tmp_path, made["keys_file_lines"])
    assert tomllib.loads(path.read_text())["apps"]["ios"]["key_sha256"] == [made["key_sha256"]]
    access = AccessControl(load_client_apps(path, RateLimit(1, 1)), FakeClock())
    assert access.check(f"Bearer {made['key']}", None) == Admitted("ios")

    again = _run("gateway-key", "new", "--app", "ios", env={"SUPPORTLENS_GATEWAY_API_KEYS_FILE": str(path)})
    assert again.returncode == 0, again.stderr
    (key,) = [line.strip() for line in again.stdout.splitlines() if line.strip().startswith("slk_")]
    assert key != made["key"]  # a new key every time
    (otel,) = [line.strip() for line in again.stdout.splitlines() if line.strip().startswith("OTEL_")]
    headers = parse_env_headers(otel.partition("=")[2])  # as an OpenTelemetry SDK reads the variable
    assert headers == {"authorization": f"Bearer {key}"}
    assert f"App ios has 1 key(s) in {path}" in again.stdout
    rotated = again.stdout[again.stdout.index("[apps.ios]"):]
    assert tomllib.loads(rotated)["apps"]["ios"]["key_sha256"] == [made["key_sha256"], key_sha256(key)]


def test_gateway_key_new_refuses_an_app_name_that_cannot_be_a_table():
    done = _run("gateway-key", "new", "--app", "ios]\n[x")
    assert done.returncode == 2
    assert "is not an app name" in done.stderr and "Traceback" not in done.stderr


def test_the_gateway_command_refuses_a_bad_keys_file_before_it_asks_kafka(tmp_path):
    path = _keys_file(tmp_path, f'[apps.ios]\nkey_sha256 = ["{IOS_OLD}"]')
    done = _run("gateway", env={"SUPPORTLENS_GATEWAY_API_KEYS_FILE": str(path),
                                "SUPPORTLENS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 2
    assert f"error: gateway API keys file {path}: line 1, [apps.ios]: key_sha256[0] holds a key itself" in done.stderr
    assert IOS_OLD not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr and "Kafka" not in done.stderr


@pytest.mark.kafka
def test_the_gateway_command_with_a_keys_file_admits_only_keyed_clients_and_never_logs_a_key(settings, tmp_path):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from supportlens.topic_reader import end_offsets
    from supportlens.topics import provision
    from test_gateway_kafka import landed

    provision(settings)
    since = end_offsets(settings, [settings.topic(name) for name in ("client-spans", "behaviour")])
    ios_key, android_key = new_key(), new_key()
    keys = _keys_file(tmp_path, f'[apps.ios]\nkey_sha256 = ["{key_sha256(ios_key)}"]\n'
                                f'[apps.android]\nkey_sha256 = ["{key_sha256(android_key)}"]\nrate_per_s = 5\n')
    port = free_port()
    log_path = tmp_path / "gateway.log"
    env = {**settings_env(settings), "SUPPORTLENS_GATEWAY_PORT": str(port),
           "SUPPORTLENS_GATEWAY_API_KEYS_FILE": str(keys)}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(supportlens_cmd("gateway", "--loglevel", "debug"), env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    health = call("GET", f"{url}/healthz")  # no key needed
                    break
                except OSError:
                    assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
            assert health.status == 200
            event = [{"event_id": "e1", "user_id": "u1", "ts_us": 1, "name": "tap"}]
            consent = {"X-Supportlens-Consent": "granted"}
            without = post_json(f"{url}/v1/behaviour", event, consent)
            wrong = post_json(f"{url}/v1/behaviour", event, {**consent, "Authorization": f"Bearer {ios_key[:-2]}"})
            stored = post_json(f"{url}/v1/behaviour", event, {**consent, KEY_HEADER: android_key})
            assert (without.status, wrong.status) == (401, 401)
            assert without.headers["WWW-Authenticate"].startswith("Bearer")
            assert (stored.status, stored.json()) == (202, {"accepted": 1, "dropped_without_consent": 0})

            # a real OpenTelemetry exporter, keyed as OTEL_EXPORTER_OTLP_HEADERS would key it
            traced = TracerProvider(resource=Resource.create(CONSENTED_APP))
            exporter = OTLPSpanExporter(f"{url}/v1/traces", headers={"Authorization": f"Bearer {ios_key}"}, timeout=10)
            traced.add_span_processor(SimpleSpanProcessor(exporter))
            with traced.get_tracer("shop").start_as_current_span("GET /pay", attributes={"http.request_id": "req-k"}):
                pass
            traced.shutdown()
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log_path.read_text()
    assert process.returncode == 0, output
    assert "API keys required, apps from" in output and "ios (1 key, 200 requests/s (bursts of 1,000))" in output
    assert "android (1 key, 5 requests/s (bursts of 1,000))" in output
    assert "refused POST /v1/behaviour" in output  # the refusals were logged (at debug) ...
    assert "refused_unauthenticated=2" in output and "spans_stored=1" in output and "behaviour_stored=1" in output
    for key in (ios_key, android_key, ios_key[:-2]):
        assert key not in output  # ... and no key, whole or in part, ever was
    assert "Traceback" not in output
    seen = landed(settings, since, ("client-spans", "behaviour"))
    assert [key for key, _ in seen["client-spans"]] == ["req-k"]
    assert [key for key, _ in seen["behaviour"]] == ["u1"]
