"""A report by e-mail through the notifications' SMTP path: a plain-text part (the Markdown), an
HTML part without scripts, and the interactive page attached. The Message-ID is the report's
kind, period and locale, so a report sent twice for one period is one message to a receiver
that drops repeats."""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.utils import formatdate
from hashlib import sha256
from pathlib import Path

from sinks.notifications import check_smtp_settings, smtp_send
from supportlens.config import Settings
from supportlens.errors import UserError
from supportlens.reports import html, markdown
from supportlens.reports.document import Document


def report_email(document: Document, key: str, sender: str, recipients: list[str], page: Path | None,
                 now_s: float) -> EmailMessage:
    """The message (pure but for reading ``page``); ``key`` names the report and its period, e.g. daily-2026-12-06."""
    msg = EmailMessage()
    msg["Subject"] = document.title
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(now_s, usegmt=True)
    domain = sender.rpartition("@")[2] or "supportlens"
    msg["Message-ID"] = f"<report-{sha256(f'{key}.{document.locale}'.encode()).hexdigest()[:32]}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(markdown.render(document), charset="utf-8", cte="base64")
    msg.add_alternative(html.render(document, charts=False), subtype="html", charset="utf-8", cte="base64")
    if page is not None:
        msg.add_attachment(page.read_bytes(), maintype="text", subtype="html", filename=page.name)
    msg["Content-Language"] = document.locale
    return msg


def send_report(settings: Settings, document: Document, key: str, page: Path | None,
                recipients: list[str] | None = None) -> list[str]:
    """Send to ``recipients`` (default: ``report_recipients``); :class:`UserError` when there are
    none or the server refuses."""
    recipients = list(recipients if recipients else settings.report_recipients)
    if not recipients:
        raise UserError("no one to send the report to",
                        hint="set SUPPORTLENS_REPORT_RECIPIENTS, e.g. '[\"support-leads@example.com\"]'")
    check_smtp_settings(settings)
    result = smtp_send(settings, report_email(document, key, settings.smtp_from, recipients, page, time.time()))
    if not result.ok:
        raise UserError(f"the SMTP server {settings.smtp_host}:{settings.smtp_port} did not take the report: "
                        f"{result.detail}", hint="check SUPPORTLENS_SMTP_* settings")
    return recipients
