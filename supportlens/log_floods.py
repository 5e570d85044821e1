"""A Kafka client's complaint is logged once a minute with a count, not twenty times a second.

While a broker is away, librdkafka reports every failed connect (about every 50 ms per
client) and aiokafka every failed fetch and metadata update (about every 100 ms): a
25-second outage wrote some 4,400 lines to serve's log, burying whatever else happened.
:class:`QuietRepeats` lets the first of a kind through, drops the same kind for a minute,
and then lets the next one through with how many it dropped. "The same kind" is the same
logger, level and message with its numbers left out (ports, milliseconds and client
numbers change from one retry to the next; what went wrong does not).

Only the Kafka clients' loggers are quieted, and the gateway's line per request answered
503 (one a request while Kafka is away; those are counted in its metrics): our other log
lines are each worth reading. librdkafka's lines reach Python logging through :data:`KAFKA_CLIENT_LOG` (the ``logger``
option of every confluent client, see :meth:`Settings.kafka_config`), so they are also
screened for secrets and formatted like every other line.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
MAX_KINDS = 512  # kinds remembered at once; the oldest is forgotten first
_NUMBERS = re.compile(r"\d+")

# Where every confluent client (librdkafka) logs: "FAIL [rdkafka#producer-1] [thrd:…]: …".
KAFKA_CLIENT_LOG = logging.getLogger("supportlens.kafka")


@dataclass
class _Kind:
    since: float  # when the line let through last was logged
    dropped: int = 0


class QuietRepeats(logging.Filter):
    """Lets one record of a kind through per ``window_s``; the next one says how many were dropped."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = MAX_KINDS) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._max_kinds = max_kinds
        self._kinds: OrderedDict[tuple[str, int, str], _Kind] = OrderedDict()
        self._lock = threading.Lock()  # librdkafka's lines come from poll() in any thread

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True  # debug lines are not complaints; a busy client makes thousands of them
        message = record.getMessage()
        key = (record.name, record.levelno, _NUMBERS.sub("#", message))
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.since < self.window_s:
                kind.dropped += 1
                return False
            dropped = kind.dropped if kind is not None else 0
            self._kinds[key] = _Kind(since=now)
            self._kinds.move_to_end(key)
            while len(self._kinds) > self._max_kinds:
                self._kinds.popitem(last=False)
        if dropped:
            record.msg, record.args = f"{message} (and {dropped} more like it in the last {self.window_s:g} s)", ()
        return True


def quiet_repeats(*prefixes: str, window_s: float = WINDOW_S) -> QuietRepeats:
    """Quiet every logger named ``prefix`` or ``prefix.*`` that exists now, with one filter.

    A filter on a logger sees only the records made on that very logger, not its
    children's, so each module logger of a library gets it; call this after the library
    is imported. Loggers that already have a :class:`QuietRepeats` keep theirs.
    """
    quiet = QuietRepeats(window_s)
    names = [name for name in logging.Logger.manager.loggerDict
             if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)]
    for name in {*names, *prefixes}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietRepeats) for f in logger.filters):
            logger.addFilter(quiet)
    return quiet


KAFKA_CLIENT_LOG.addFilter(QuietRepeats())
