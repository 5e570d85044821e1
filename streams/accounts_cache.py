"""The customer accounts, kept in memory from the compacted ``accounts`` topic.

The incident manager needs every account (tier, locale, channel) but owns one partition
of its own input, not of ``accounts``; so a background consumer reads all of ``accounts``
from the beginning, then follows it. A compacted topic holds one record per account, so
memory is bounded by the number of accounts. An invalid record is skipped with a warning
(``accounts import`` validates before producing; the sink dead-letters what it cannot store).
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from supportlens.config import Settings
from supportlens.contracts import Account, InvalidRecord, decode

log = logging.getLogger(__name__)


class AccountsCache:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accounts: dict[str, Account] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="accounts-cache", daemon=True)

    def start(self) -> AccountsCache:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        topic = self.settings.topic("accounts")
        consumer = Consumer(self.settings.kafka_config(**{
            "group.id": f"{self.settings.topic_prefix}accounts-cache",  # never committed: every process reads all
            "enable.auto.commit": False,
        }))
        try:
            metadata = consumer.list_topics(topic, timeout=30).topics[topic]
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
            while not self._stop.is_set():
                for message in consumer.consume(num_messages=1000, timeout=1.0):
                    if message.error() is not None:
                        continue
                    self._apply(message.key(), message.value())
        except KafkaException as exc:
            log.error("accounts cache stopped: %s; VIP notifications use the accounts read so far", exc)
        finally:
            consumer.close()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:  # a tombstone: the account was deleted
            if key is not None:
                self.accounts.pop(key.decode(errors="replace"), None)
            return
        try:
            account = decode(value, Account, self.settings.max_record_bytes)
        except InvalidRecord as exc:
            log.warning("accounts: skipping an invalid record (%s)", exc.reason)
            return
        self.accounts[account.account_id] = account
