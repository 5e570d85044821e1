"""Which customer accounts hear from us, and what they read (pure).

- **Incident notices** (DESIGN.md §6): when an incident is declared, the accounts seen in its
  failures are looked up; each VIP account gets one notice in its locale — what is affected,
  since when, what to do meanwhile, where to follow — and one follow-up when the incident
  resolves. Accounts affected later in the incident get their notice then. Non-VIP accounts
  are counted, never messaged.
- **Best-practice advice**: a VIP account whose requests are refused for the same catalogued
  misuse at least ``min_per_day`` times in a UTC day gets the catalogue's advice for it, at
  most once every ``every_days`` per pattern.

Every notice has a deterministic id — (incident, account, kind), or (account, pattern, the
day the advice window opened) — the idempotency key that makes a repeated decision the
same outbox record. Drill incidents make drill notices, which delivery sends only to the
drill channel.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from supportlens.contracts import Account, IncidentEvent, Notification
from supportlens.errors import UserError
from streams.catalog import Catalog

DEFAULT_TEMPLATES_PATH = Path(__file__).with_name("notice_templates.toml")
DAY_US = 86_400_000_000


class Template(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subject: str
    body: str


class LocaleTemplates(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    incident_declared: Template
    incident_resolved: Template
    misuse_advice: Template
    dimension_names: dict[str, str]
    no_status_page: str


class AdviceRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    min_per_day: int
    every_days: int


class Templates(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"zh_cn": "zh-CN"}):
    version: int
    advice: AdviceRules
    en: LocaleTemplates
    zh_cn: LocaleTemplates

    def of(self, locale: str) -> LocaleTemplates:
        return self.zh_cn if locale == "zh-CN" else self.en


def load_templates(path: Path = DEFAULT_TEMPLATES_PATH) -> Templates:
    try:
        return msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), Templates)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise UserError(f"invalid notice templates {path}: {exc}",
                        hint="compare it with streams/notice_templates.toml") from None


class NoticeState(msgspec.Struct, kw_only=True):
    notified: dict[str, list[str]] = {}  # incident id → accounts told it was declared
    misuse_today: dict[str, int] = {}  # "account|code|day" → refused requests that UTC day
    advised: dict[str, int] = {}  # "account|code" → the UTC day (since the epoch) advice was last given


def _id(*parts: object) -> str:
    return "n-" + hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=10).hexdigest()


def _when(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class Notifier:
    """Turns incident transitions and misuse counts into outbox records; keeps what it has sent."""

    def __init__(self, templates: Templates, catalog: Catalog, status_url: str, state: NoticeState | None = None):
        self.templates = templates
        self.catalog = catalog
        self.status_url = status_url
        self.state = state or NoticeState()

    # ---- incidents ------------------------------------------------------------------------
    def for_incident(self, event: IncidentEvent, affected: Iterable[str],
                     accounts: Mapping[str, Account]) -> list[Notification]:
        """Notices due after ``event``, given every account affected so far."""
        if event.transition == "resolved":
            told = self.state.notified.pop(event.incident_id, [])
            return [self._incident_notice(event, accounts[a], "incident_resolved") for a in told if a in accounts]
        # mitigated too: a worker catching up on a backlog closes a whole surge in one step, and the
        # accounts its later buckets hurt are first seen with the mitigation; they were affected
        if event.transition not in ("declared", "updated", "escalated", "mitigated"):
            return []
        told = self.state.notified.setdefault(event.incident_id, [])
        new = sorted(a for a in set(affected) - set(told) if (acct := accounts.get(a)) is not None and acct.tier == "vip")
        told.extend(new)
        return [self._incident_notice(event, accounts[a], "incident_declared") for a in new]

    def _incident_notice(self, event: IncidentEvent, account: Account, kind: str) -> Notification:
        words = self.templates.of(account.locale)
        template = words.incident_declared if kind == "incident_declared" else words.incident_resolved
        cls = event.dimensions.get("diagnosis_class", "server_error")
        meanwhile, _ = self.catalog.wording(cls if cls in self.catalog.classes else "unknown", "", account.locale)  # type: ignore[arg-type]
        fields = {
            "title": event.title,
            "what": self._what(event.dimensions, account.locale),
            "since": _when(event.started_at_us),
            "until": _when(event.resolved_at_us or event.at_us),
            "meanwhile": meanwhile.action,
            "follow": self.status_url or words.no_status_page,
            "incident": event.incident_id,
            "account": account.name or account.account_id,
        }
        return self._notice(account, kind, _id(event.incident_id, account.account_id, kind), event.at_us,
                            template, fields, incident_id=event.incident_id, drill=event.drill)

    def _what(self, dimensions: dict[str, str], locale: str) -> str:
        names = self.templates.of(locale).dimension_names
        parts = []
        for dimension, value in dimensions.items():
            if dimension == "diagnosis_class":
                continue
            shown = self.catalog.label_of(value, locale) if dimension == "service" else value
            space = "" if locale == "zh-CN" else " "
            parts.append(f"{names.get(dimension, dimension)}{space}{shown}")
        return ", ".join(parts) or names.get("service", "service")

    # ---- misuse advice -------------------------------------------------------------------------
    def for_misuse(self, account_id: str, code: str, count: int, at_us: int, accounts: Mapping[str, Account],
                   drill: bool = False) -> list[Notification]:
        """Count refused requests of one pattern; advice when the day's count reaches the threshold."""
        rules = self.templates.advice
        day = at_us // DAY_US
        key = f"{account_id}|{code}|{day}"
        before = self.state.misuse_today.get(key, 0)
        self.state.misuse_today[key] = before + count
        self._forget_old_days(day)
        account = accounts.get(account_id)
        entry = self.catalog.codes.get(code)
        if account is None or account.tier != "vip" or entry is None or entry.cls != "client_misuse":
            return []
        if not before < rules.min_per_day <= before + count:
            return []  # not the moment the threshold is crossed
        last_day = self.state.advised.get(f"{account_id}|{code}")
        if last_day is not None and day - last_day < rules.every_days:
            return []
        self.state.advised[f"{account_id}|{code}"] = day
        wording, doc = self.catalog.wording("client_misuse", code, account.locale)
        words = self.templates.of(account.locale)
        fields = {"advice_title": wording.title, "explanation": wording.explanation, "action": wording.action,
                  "doc": doc, "count": str(before + count), "code": code, "account": account.name or account_id}
        return [self._notice(account, "misuse_advice", _id(account_id, code, day), at_us, words.misuse_advice,
                             fields, drill=drill, attributes={"code": code, "refused_today": before + count})]

    def _forget_old_days(self, day: int) -> None:
        stale = [k for k in self.state.misuse_today if int(k.rsplit("|", 1)[1]) < day - 1]
        for key in stale:
            del self.state.misuse_today[key]

    # ---- shared --------------------------------------------------------------------------------
    def _notice(self, account: Account, kind: str, notification_id: str, at_us: int, template: Template,
                fields: dict[str, str], *, incident_id: str = "", drill: bool = False,
                attributes: dict[str, str | int] | None = None) -> Notification:
        to = account.webhook_url if account.channel == "webhook" else (
            account.contacts[0].email if account.channel == "email" and account.contacts else "")
        return Notification(
            notification_id=notification_id, account_id=account.account_id, kind=kind,  # type: ignore[arg-type]
            created_at_us=at_us, incident_id=incident_id, channel=account.channel, to=to, locale=account.locale,
            subject=template.subject.format(**fields)[:4096], body=template.body.format(**fields)[:4096],
            drill=drill, attributes=attributes or {},
        )


def vip_count(accounts_seen: Iterable[str], accounts: Mapping[str, Account]) -> tuple[int, int]:
    """(affected accounts, of which VIP)."""
    seen = set(accounts_seen)
    return len(seen), sum(1 for a in seen if (acct := accounts.get(a)) is not None and acct.tier == "vip")
