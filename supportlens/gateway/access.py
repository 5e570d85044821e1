"""Who may send to the gateway: an API key per client app, and each app's rate limit.

The keys file (setting ``gateway_api_keys_file``) lists client apps with the SHA-256 of
each of their keys, never a key itself, so the file is no secret and may live in a
repository::

    [apps.ios]
    key_sha256 = ["9f86d0…", "60303a…"]   # several while a key is being replaced
    rate_per_s = 50                        # optional; default gateway_rate_per_s (0: no limit)
    burst = 200                            # optional; default gateway_rate_burst

A client sends its key as ``Authorization: Bearer <key>`` (what OpenTelemetry exporters
send through ``OTEL_EXPORTER_OTLP_HEADERS``) or ``X-Supportlens-Key: <key>``. Keys are 256
random bits, so one round of SHA-256 protects them as well as a slow password hash would;
the digests are compared in constant time against every known one. Without a keys file
the gateway is open: every request is admitted, unlimited (local use).

Nothing here does network I/O: :meth:`AccessControl.check` is a decision over two header
values and an injected clock. A bad keys file raises :class:`UserError` naming the file,
the line of the app and the problem, never the value that was wrong (it might be a key).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from supportlens.config import Settings
from supportlens.errors import UserError
from supportlens.gateway.ratelimit import RateLimit, RateLimiter, retry_after_s

KEY_HEADER = "X-Supportlens-Key"
KEY_PREFIX = "slk_"  # lets secret scanners and people recognise a leaked key
UNKNOWN_APP = "(unknown)"  # the app of a request whose key is missing or unknown (a metric label)
APP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a TOML bare key, a clean metric label
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_APP_ENTRIES = ("key_sha256", "rate_per_s", "burst")
_HOW_TO_SEND = f"send it as `Authorization: Bearer <key>` or `{KEY_HEADER}: <key>`"
_KEYS_HINT = "`supportlens gateway-key new --app <name>` prints a new key and the lines to add for it"


@dataclass(frozen=True)
class ClientApp:
    """One client app: the hex SHA-256 of each of its keys and how fast it may send."""

    name: str
    key_sha256: tuple[str, ...]
    limit: RateLimit


@dataclass(frozen=True)
class Admitted:
    app: str  # "" when the gateway is open


@dataclass(frozen=True)
class Refused:
    """An answer instead of the endpoint's: 401 (no or an unknown key) or 429 (over the app's rate)."""

    status: int
    reason: Literal["unauthenticated", "rate_limited"]
    app: str  # UNKNOWN_APP when unauthenticated
    message: str  # for the client's developer; never contains the key
    retry_after_s: int = 0  # for 429: whole seconds until the app may send again


def new_key() -> str:
    """A fresh key: ``slk_`` and 256 random bits, URL-safe base64 (fits any header, env variable or URL)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    """The hex SHA-256 of a key as a client sends it (what the keys file lists)."""
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def presented_key(authorization: str | None, key_header: str | None) -> str | Refused:
    """The key a request carries: ``X-Supportlens-Key`` when sent (a proxy in front may need
    ``Authorization`` for itself), else an ``Authorization: Bearer`` token; else a 401 saying why."""
    if key_header and key_header.strip():
        return key_header.strip()
    if authorization and authorization.strip():
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":  # not echoed: a key sent without its scheme would be the "scheme"
            return _unauthenticated(f"the Authorization header holds no Bearer token: {_HOW_TO_SEND}")
        if token.strip():
            return token.strip()
    return _unauthenticated(f"this gateway needs an API key: {_HOW_TO_SEND}")


def _unauthenticated(message: str) -> Refused:
    return Refused(401, "unauthenticated", UNKNOWN_APP, message)


class AccessControl:
    """Admits a request when its key belongs to an app that is under its rate; all of them when open.

    ``apps is None`` means open: no keys file was configured.
    """

    def __init__(self, apps: Sequence[ClientApp] | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.apps: tuple[ClientApp, ...] | None = None if apps is None else tuple(apps)
        self._digests = [(digest, app.name) for app in self.apps or () for digest in app.key_sha256]
        self._limiter = RateLimiter({app.name: app.limit for app in self.apps or ()}, clock)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.monotonic) -> AccessControl:
        """Open without ``gateway_api_keys_file``; else the apps of that file (:class:`UserError` if it is bad)."""
        if settings.gateway_api_keys_file is None:
            return cls(None, clock)
        default = RateLimit(settings.gateway_rate_per_s, settings.gateway_rate_burst)
        return cls(load_client_apps(settings.gateway_api_keys_file, default), clock)

    @property
    def open(self) -> bool:
        return self.apps is None

    def identify(self, key: str) -> str | None:
        """The app ``key`` belongs to, or None. Every known digest is compared, in constant time,
        so the time taken says nothing about how close a guess came."""
        digest = key_sha256(key)
        found = None
        for known, app in self._digests:
            if hmac.compare_digest(known, digest) and found is None:
                found = app
        return found

    def check(self, authorization: str | None, key_header: str | None) -> Admitted | Refused:
        """Decide on a request from its ``Authorization`` and ``X-Supportlens-Key`` headers; an
        admitted request has taken a token from its app's bucket."""
        if self.open:
            return Admitted("")
        key = presented_key(authorization, key_header)
        if isinstance(key, Refused):
            return key
        app = self.identify(key)
        if app is None:
            return _unauthenticated(
                "this API key is not valid here: it may have been replaced; ask the operator of this gateway "
                "for your app's current key"
            )
        wait_s = self._limiter.admit(app)
        if wait_s > 0:
            seconds = retry_after_s(wait_s)
            limit = self._limiter.limit_of(app).describe()
            return Refused(429, "rate_limited", app, f"app {app} sends more than its limit of {limit}; "
                           f"retry in {seconds} s", seconds)
        return Admitted(app)


# --- the keys file -----------------------------------------------------------------------


def load_client_apps(path: Path, default: RateLimit) -> tuple[ClientApp, ...]:
    """The apps of a keys file; ``default`` for an app that sets no limit of its own.

    Raises :class:`UserError` when the file cannot be read, is not TOML, lists no app, or an
    app has no key, a value that is not a SHA-256 digest, a key of another app, a bad limit
    or an entry it does not know. The message names the file, the app and its line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"gateway API keys file {path} does not exist",
                        hint="check gateway_api_keys_file / SUPPORTLENS_GATEWAY_API_KEYS_FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not UTF-8 text"
        raise UserError(f"gateway API keys file {path} cannot be read: {reason}",
                        hint="check gateway_api_keys_file / SUPPORTLENS_GATEWAY_API_KEYS_FILE") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message gives the line and column, not the text
        raise UserError(f"gateway API keys file {path} is not valid TOML: {exc}", hint=_KEYS_HINT) from None
    unknown = sorted(set(document) - {"apps"})
    if unknown:
        raise _file_error(path, f"unknown entry {unknown[0]!r}: the file holds [apps.<name>] tables only")
    apps_table = document.get("apps")
    if not isinstance(apps_table, dict) or not apps_table:
        raise _file_error(path, "no app listed: add an [apps.<name>] table for each client app")
    apps: list[ClientApp] = []
    owner: dict[str, str] = {}
    for name, entries in apps_table.items():
        where = _where(text, name)
        app = _client_app(path, where, name, entries, default)
        for index, digest in enumerate(app.key_sha256):
            if digest in owner:
                other = "listed twice" if owner[digest] == name else f"already a key of app {owner[digest]}"
                raise _file_error(path, f"{where}: key_sha256[{index}] is {other}: a key belongs to one app, once")
            owner[digest] = name
        apps.append(app)
    return tuple(apps)


def _client_app(path: Path, where: str, name: str, entries: Any, default: RateLimit) -> ClientApp:
    if not APP_NAME.match(name):
        raise _file_error(path, f"{where}: an app name has 1 to 64 letters, digits, '-' or '_'")
    if not isinstance(entries, dict):
        raise _file_error(path, f"{where}: must be a table with key_sha256 (and optionally rate_per_s, burst)")
    unknown = sorted(set(entries) - set(_APP_ENTRIES))
    if unknown:  # only the name: a misplaced value could be a key
        raise _file_error(path, f"{where}: unknown entry {unknown[0]!r}; an app has {', '.join(_APP_ENTRIES)}")
    digests = entries.get("key_sha256")
    if isinstance(digests, str):
        digests = [digests]
    if not isinstance(digests, list) or not digests:
        raise _file_error(path, f"{where}: key_sha256 must list the SHA-256 of at least one key")
    for index, digest in enumerate(digests):
        if isinstance(digest, str) and digest.startswith(KEY_PREFIX):
            raise _file_error(path, f"{where}: key_sha256[{index}] holds a key itself, not its hash: remove it, "
                              "treat that key as leaked and make a new one")
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
            raise _file_error(path, f"{where}: key_sha256[{index}] is not a SHA-256 digest (64 hex characters)")
    per_s = entries.get("rate_per_s", default.per_s)
    burst = entries.get("burst", default.burst)
    if isinstance(per_s, bool) or not isinstance(per_s, int | float) or not math.isfinite(per_s) or per_s < 0:
        raise _file_error(path, f"{where}: rate_per_s must be a number of requests per second, 0 or more "
                          "(0: no limit)")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise _file_error(path, f"{where}: burst must be a whole number of requests, 1 or more")
    return ClientApp(name, tuple(digest.lower() for digest in digests), RateLimit(float(per_s), burst))


def _where(text: str, name: str) -> str:
    """``line 4, [apps.ios]``: where a person finds the app (the line of its table header, if it has one)."""
    quoted = re.escape(name)
    header = re.compile(rf"""^[ \t]*\[[ \t]*apps[ \t]*\.[ \t]*(?:{quoted}|"{quoted}"|'{quoted}')[ \t]*\]""", re.M)
    found = header.search(text)
    shown = f"[apps.{name[:64]}]"
    if found is None:  # e.g. an inline table: no header line to point at
        return shown
    line = text.count("\n", 0, found.start()) + 1
    return f"line {line}, {shown}"


def _file_error(path: Path, problem: str, hint: str = _KEYS_HINT) -> UserError:
    return UserError(f"gateway API keys file {path}: {problem}", hint=hint)


def keys_file_lines(app: str, digests: Iterable[str]) -> str:
    """The TOML an operator adds to the keys file for ``app`` with these key digests."""
    listed = ", ".join(f'"{digest}"' for digest in digests)
    return (f"[apps.{app}]\nkey_sha256 = [{listed}]\n"
            "# rate_per_s = 50   # optional: requests per second (0: no limit); default gateway_rate_per_s\n"
            "# burst = 200       # optional: requests at once; default gateway_rate_burst\n")
