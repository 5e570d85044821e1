"""Customer accounts: read them from a CSV file, check them, load them onto ``accounts``.

``accounts`` is a compacted topic keyed by account id: the latest record of an account is
the account (DESIGN.md §6). People keep their accounts in a spreadsheet, so the import
reads CSV with the columns of :data:`COLUMNS`; ``contact_emails`` holds ``;``-separated
addresses, each either ``ops@example.com`` or ``Ann Lee <ann@example.com>``.

Parsing and checking (:func:`parse_accounts`) is pure: every bad row becomes a
:class:`RowProblem` naming its line, its column and the problem in plain words, while the
good rows are kept. Reading the file (:func:`read_accounts_file`), producing
(:func:`produce_accounts`) and reading the topic back (:func:`read_accounts`) are separate.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from supportlens.bulk_producer import BulkProducer
from supportlens.config import Settings
from supportlens.contracts import Account, InvalidRecord, decode, encode, explain
from supportlens.errors import UserError
from supportlens.topic_reader import read_range
from supportlens.topics import require_topics

COLUMNS: tuple[str, ...] = ("account_id", "name", "tier", "locale", "channel", "webhook_url", "contact_emails",
                            "service_manager")
_NAMED_ADDRESS = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<email>[^<>]*)>$")
_LOCALES = {"en": "en", "zh-cn": "zh-CN"}

# What a column may hold, in a person's words (msgspec's own message names a regex).
_ALLOWED: dict[str, str] = {
    "account_id": "1–128 visible ASCII characters, no spaces",
    "tier": "vip or standard",
    "locale": "en or zh-CN",
    "channel": "webhook, email or none",
    "webhook_url": "an http:// or https:// URL without spaces",
    "contact_emails": "addresses like ops@example.com or Ann Lee <ann@example.com>, separated by ;",
}


@dataclass(frozen=True)
class RowProblem:
    """Why one line of the file was not imported."""

    line: int
    column: str  # a column of the file, or "" when the line as a whole is wrong
    problem: str

    def __str__(self) -> str:
        where = f"`{self.column}`: " if self.column else ""
        return f"line {self.line}: {where}{self.problem}"


@dataclass
class ParsedAccounts:
    """The good rows (with their line numbers) and the problems of the bad ones, in file order."""

    accounts: list[tuple[int, Account]] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return len({problem.line for problem in self.problems})


def parse_accounts(lines: Iterable[str], source: str = "the file") -> ParsedAccounts:
    """Check every row of an accounts CSV (header first) against the ``Account`` contract.

    A row is bad when a value breaks the contract, when ``channel`` is ``webhook`` without a
    ``webhook_url`` or ``email`` without a contact, when it has more or fewer fields than
    the header, or when its account id already came on an earlier line (the first wins).
    Bad rows are reported, good ones kept. Raises :class:`UserError` when the file as a
    whole cannot be read as accounts: no header, an unknown column, no ``account_id`` column.
    """
    reader = csv.reader(iter(lines), strict=True)
    header = _read_header(reader, source)
    result = ParsedAccounts()
    seen: dict[str, int] = {}
    line = reader.line_num
    while True:
        start = line + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            result.problems.append(RowProblem(start, "", f"cannot be read as CSV ({exc})"))
            line = reader.line_num
            continue
        line = reader.line_num
        if not any(value.strip() for value in row):
            continue  # a blank line
        if len(row) != len(header):
            result.problems.append(RowProblem(
                start, "", f"has {len(row)} fields, the header has {len(header)} "
                "(a value with a comma must be in double quotes)"))
            continue
        account, problems = check_row(dict(zip(header, row)), start)
        if account is not None and account.account_id in seen:
            problems = [RowProblem(start, "account_id", f"{account.account_id!r} is already on line "
                                   f"{seen[account.account_id]}; only that line is imported")]
        if problems:
            result.problems.extend(problems)
        else:
            assert account is not None
            seen[account.account_id] = start
            result.accounts.append((start, account))
    return result


def _read_header(reader: Iterator[list[str]], source: str) -> list[str]:
    expected = ",".join(COLUMNS)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{source} is empty", hint=f"the first line names the columns: {expected}") from None
    except csv.Error as exc:
        raise UserError(f"the first line of {source} is not CSV ({exc})",
                        hint=f"it names the columns: {expected}") from None
    names = [name.strip().lower().lstrip("\ufeff") for name in header]
    if "account_id" not in names:
        raise UserError(f"the first line of {source} is not a header naming the columns",
                        hint=f"start the file with the line: {expected}")
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        raise UserError(f"unknown column{'s' if len(unknown) > 1 else ''} in {source}: "
                        + ", ".join(repr(name[:40]) for name in unknown[:5]),
                        hint=f"the columns are: {expected}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"column {twice[0]!r} appears twice in the header of {source}",
                        hint=f"the columns are: {expected}")
    return names


def check_row(values: dict[str, str], line: int) -> tuple[Account | None, list[RowProblem]]:
    """One row (column → text) as an :class:`Account`, or every problem found in it (pure).

    Each column is checked on its own, so a row with two bad values gets both named.
    """
    raw: dict[str, Any] = {}
    for column in COLUMNS:
        text = (values.get(column) or "").strip()
        if not text:
            continue
        if column in ("tier", "channel"):
            raw[column] = text.lower()
        elif column == "locale":
            raw[column] = _LOCALES.get(text.lower(), text)
        elif column != "contact_emails":
            raw[column] = text
    problems: list[RowProblem] = []
    contacts, contact_problem = _contacts(values.get("contact_emails") or "")
    if contact_problem:
        problems.append(RowProblem(line, "contact_emails", contact_problem))
    elif contacts:
        raw["contacts"] = contacts
    if "account_id" not in raw:
        problems.append(RowProblem(line, "account_id", "is empty; every account needs an id"))
    for column, value in raw.items():
        problem = _contract_problem(column, value)
        if problem:
            problems.append(RowProblem(line, "contact_emails" if column == "contacts" else column, problem))
    if problems:
        problems.sort(key=lambda p: COLUMNS.index(p.column))
        return None, problems
    account = msgspec.convert(raw, Account)
    if account.channel == "webhook" and not account.webhook_url:
        problems.append(RowProblem(line, "webhook_url", "is empty, but channel is webhook: "
                                   "give the URL notifications are posted to, or another channel"))
    if account.channel == "email" and not account.contacts:
        problems.append(RowProblem(line, "contact_emails", "is empty, but channel is email: "
                                   "give at least one address, or another channel"))
    return (None, problems) if problems else (account, [])


def _contacts(text: str) -> tuple[list[dict[str, str]], str]:
    contacts = []
    for number, part in enumerate((p.strip() for p in text.split(";")), 1):
        if not part:
            continue
        match = _NAMED_ADDRESS.match(part)
        name, email = (match.group("name").strip().strip('"'), match.group("email").strip()) if match else ("", part)
        if not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
            return [], f"address {number} ({part[:80]!r}) is not an e-mail address; use {_ALLOWED['contact_emails']}"
        contacts.append({"name": name, "email": email} if name else {"email": email})
    return contacts, ""


def _contract_problem(column: str, value: Any) -> str:
    """What the ``Account`` contract says about one value, in plain words ("" when it is fine)."""
    probe = {"account_id": "probe", column: value}
    try:
        msgspec.convert(probe, Account)
    except msgspec.ValidationError as exc:
        reason = explain(str(exc))
        _, _, said = reason.partition(": ")
        said = said or reason
        allowed = _ALLOWED.get("contact_emails" if column == "contacts" else column)
        if "matching regex" in said and allowed:
            return f"{str(value)[:80]!r} is not {allowed}"
        if said.startswith("invalid enum value") and allowed:
            return f"{said}; use {allowed}"
        longest = re.fullmatch(r"expected `(str|array)` of length <= (\d+)", said)
        if longest:
            unit = "characters" if longest.group(1) == "str" else "entries"
            return f"is longer than {longest.group(2)} {unit}"
        return said
    return ""


def produce_accounts(settings: Settings, accounts: Iterable[Account], timeout_s: float = 30.0) -> int:
    """Write accounts to the compacted ``accounts`` topic, keyed by account id; returns how many.

    The producer is idempotent and flushed before returning. Raises :class:`UserError` when
    Kafka is unreachable, the topic is missing, or a record was not acknowledged.
    """
    require_topics(settings, ("accounts",))
    producer = BulkProducer(settings, timeout_s=timeout_s)
    topic = settings.topic("accounts")
    sent = 0
    for account in accounts:
        producer.send(topic, account.account_id, encode(account))
        sent += 1
    producer.finish("run the import again, it is idempotent", hint=f"check the broker at {settings.kafka_bootstrap}")
    return sent


def read_accounts(settings: Settings) -> list[Account]:
    """The current accounts on the compacted topic, by account id (a tombstone deletes one).

    Records that do not decode are skipped: the topic is written by this module and the simulator.
    """
    require_topics(settings, ("accounts",))
    latest: dict[str, Account | None] = {}
    for message in read_range(settings, [settings.topic("accounts")]):
        key = (message.key() or b"").decode("utf-8", "replace")
        if message.value() is None:
            latest[key] = None
            continue
        try:
            account = decode(message.value(), Account, settings.max_record_bytes)
        except InvalidRecord:
            continue
        latest[account.account_id] = account
    return sorted((a for a in latest.values() if a is not None), key=lambda a: a.account_id)


def read_accounts_file(path: Path) -> ParsedAccounts:
    """Parse an accounts CSV file; raises :class:`UserError` when it cannot be read at all."""
    hint = "give the path of a CSV file like deploy/examples/accounts.csv"
    if not path.exists():
        raise UserError(f"{path} does not exist", hint=hint)
    if not path.is_file():
        raise UserError(f"{path} is not a file", hint=hint)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return parse_accounts(handle, source=str(path))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text",
                        hint="save the spreadsheet as CSV UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from None
