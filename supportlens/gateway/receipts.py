"""A retried fault report is the same record: the gateway keeps the first receipt of each report id.

A client retrying after a 503 sends the report again with the id it chose. Kafka may have
stored the refused attempt all the same — a broker that stalls past the gateway's delivery
timeout appends the waiting request when it wakes — and the report's ClickHouse row is keyed
by (client_ip, received_at, report_id): stamped with a new receive time, the retry would be a
second row. Stamped with the first attempt's time and address it is the same record, which
the table keeps once. Per gateway process: a retry that reaches another gateway is not known there.
"""

from __future__ import annotations

from collections import OrderedDict

CAPACITY = 100_000  # report ids remembered; the oldest are forgotten first (about 35 MB when full)


class ReportReceipts:
    """``(received_at_us, client_ip)`` of the report ids the gateway saw lately, accepted or refused."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._first: OrderedDict[str, tuple[int, str]] = OrderedDict()

    def first(self, report_id: str, received_at_us: int, client_ip: str) -> tuple[int, str]:
        """The receipt of ``report_id``'s first attempt; this one's if it is the first."""
        known = self._first.get(report_id)
        if known is not None:
            self._first.move_to_end(report_id)
            return known
        self._first[report_id] = (received_at_us, client_ip)
        if len(self._first) > self._capacity:
            self._first.popitem(last=False)
        return received_at_us, client_ip
