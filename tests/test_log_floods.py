"""Kafka clients' repeated complaints are quieted: once a minute per kind, with a count."""

from __future__ import annotations

import logging
import socket
import time

from confluent_kafka import Producer

from supportlens.config import Settings
from supportlens.log_floods import KAFKA_CLIENT_LOG, QuietRepeats, quiet_repeats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, name: str = "aiokafka.conn", level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_one_line_a_window_per_kind_then_the_count_of_what_was_dropped():
    clock = Clock()
    quiet = QuietRepeats(window_s=60, clock=clock)
    first = record("Unable connect to node with id %d: [Errno 111] Connect call failed ('127.0.0.1', %d)", 1, 40123)
    assert quiet.filter(first)
    assert first.getMessage() == "Unable connect to node with id 1: [Errno 111] Connect call failed ('127.0.0.1', 40123)"
    for retry in range(599):  # ten a second, other numbers each time: the same kind
        clock.now += 0.1
        assert not quiet.filter(record("Unable connect to node with id %d: [Errno 111] Connect call failed "
                                       "('127.0.0.1', %d)", retry % 3, 40000 + retry))
    clock.now = 1000.0 + 60  # a window after the first
    after = record("Unable connect to node with id %d: [Errno 111] Connect call failed ('127.0.0.1', %d)", 2, 40999)
    assert quiet.filter(after)
    assert after.getMessage() == ("Unable connect to node with id 2: [Errno 111] Connect call failed "
                                  "('127.0.0.1', 40999) (and 599 more like it in the last 60 s)")


def test_other_kinds_loggers_and_levels_are_not_held_back():
    clock = Clock()
    quiet = QuietRepeats(window_s=60, clock=clock)
    assert quiet.filter(record("Failed fetch messages from %d: NodeNotReadyError", 1))
    assert quiet.filter(record("Unable to update metadata from [%d]", 1))
    assert quiet.filter(record("Failed fetch messages from %d: NodeNotReadyError", 1, name="aiokafka.consumer.fetcher"))
    assert quiet.filter(record("Failed fetch messages from %d: NodeNotReadyError", 1, level=logging.WARNING))
    assert not quiet.filter(record("Failed fetch messages from %d: NodeNotReadyError", 2))


def test_a_kind_seen_once_a_window_is_never_dropped_or_counted():
    clock = Clock()
    quiet = QuietRepeats(window_s=60, clock=clock)
    for _ in range(3):
        line = record("Group coordinator lost")
        assert quiet.filter(line)
        assert line.getMessage() == "Group coordinator lost"
        clock.now += 61


def test_it_remembers_a_bounded_number_of_kinds():
    clock = Clock()
    quiet = QuietRepeats(window_s=60, clock=clock, max_kinds=3)
    for word in ("a", "b", "c", "d"):
        assert quiet.filter(record(f"broker {word} is away"))
    assert quiet.filter(record("broker a is away"))  # forgotten, so let through again
    assert not quiet.filter(record("broker d is away"))


def test_quiet_repeats_reaches_every_module_logger_of_a_library():
    parent, child = logging.getLogger("floodlib"), logging.getLogger("floodlib.conn.pool")
    other = logging.getLogger("floodlibrary")
    quiet = quiet_repeats("floodlib")
    assert quiet in parent.filters and quiet in child.filters
    assert not other.filters
    assert quiet_repeats("floodlib") is not None and child.filters == [quiet]  # no second filter


def test_librdkafka_lines_reach_python_logging_quieted(caplog, monkeypatch):
    """A real confluent producer towards a port nobody listens on: its connect failures come
    through Python logging (so also through the secret screen), one of a kind."""
    monkeypatch.setattr(KAFKA_CLIENT_LOG, "filters", [QuietRepeats()])  # not what other tests' clients left
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: connects are refused
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}")
    config = settings.producer_config(**{"reconnect.backoff.ms": 10, "reconnect.backoff.max.ms": 10})
    assert config["logger"] is KAFKA_CLIENT_LOG
    producer = Producer(config)
    with caplog.at_level(logging.DEBUG, logger=KAFKA_CLIENT_LOG.name):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            producer.poll(0.05)
    refused = [r.getMessage() for r in caplog.records
               if r.name == KAFKA_CLIENT_LOG.name and "Connection refused" in r.getMessage()]
    assert refused, "librdkafka's connect failures did not reach Python logging"
    assert len(refused) == 1, refused  # unquieted, librdkafka logs about two a second here
    assert f"127.0.0.1:{port}" in refused[0]
