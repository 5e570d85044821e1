"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, keeping every mail it accepts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aiosmtpd.controller import Controller

from helpers import free_port


class Mailbox:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued as T1"


@contextlib.contextmanager
def running_mailbox() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield mailbox, controller.port
    finally:
        controller.stop()
