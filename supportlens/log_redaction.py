"""Secrets never reach a log line, whoever writes it.

Our own code never logs a secret, but libraries below it may: aiokafka, at debug level,
logs every request it sends, the SASL login included. So every log record of the process
is screened where it is made, whichever logger and handler it later goes through (Faust
installs handlers of its own), and each configured secret is replaced by ``***``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

MASK = "***"
_installed: list[tuple[str, ...]] = []  # the secrets of the factory in place, so a second call only adds


def _forms(secret: str) -> set[str]:
    """The secret as text, and as it looks inside a ``bytes`` repr (how protocol dumps show it)."""
    return {secret, repr(secret.encode())[2:-1]}


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def keep_secrets_out_of_logs(secrets: Iterable[str]) -> None:
    """From now on, every log record of this process has ``secrets`` masked in its message.

    Records are formatted once, here, only when one of them holds a secret; others pass
    untouched (their arguments still formatted lazily by the handler).
    """
    forms = tuple(sorted({form for secret in secrets if secret for form in _forms(secret)}, key=len, reverse=True))
    if not forms:
        return
    if _installed:
        _installed[0] = tuple(sorted({*_installed[0], *forms}, key=len, reverse=True))
        return
    _installed.append(forms)
    make_record = logging.getLogRecordFactory()

    def screened(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        clean = redact(message, _installed[0])
        if clean is not message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_text is None and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text, _installed[0]) != text:
                record.exc_text = redact(text, _installed[0])
        return record

    logging.setLogRecordFactory(screened)
