"""Webhook signatures: HMAC-SHA256 over the timestamp and the raw body.

The header a receiver gets is ``X-Supportlens-Signature: t=<unix seconds>,v1=<hex>``
where ``<hex>`` is ``HMAC-SHA256(secret, "<t>." + raw body)``. Signing the timestamp
with the body lets a receiver refuse a replayed request: a captured request cannot be
re-sent with a fresh ``t`` without the secret. Several ``v1=`` entries may appear (a
receiver that rotates its secret accepts any that matches).
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Supportlens-Signature"
DEFAULT_TOLERANCE_S = 300


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def signature(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>." + body`` under ``secret``."""
    return hmac.new(_key(secret), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` sent at ``timestamp`` (Unix seconds)."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify_signature(
    secret: str | bytes, header: str, body: bytes, now: float, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> bool:
    """True when ``header`` signs exactly ``body`` under ``secret`` and its timestamp is within
    ``tolerance_s`` of ``now`` (either side: clocks drift both ways).

    A malformed header, a missing part, another body, another timestamp or an old one all
    give False; nothing raises. The comparison is timing-safe (:func:`hmac.compare_digest`).
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()):
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body)
    # every candidate is compared, so the time taken does not tell which one matched
    matches = [hmac.compare_digest(expected.encode("ascii"), value.encode("utf-8")) for value in candidates]
    return any(matches)
