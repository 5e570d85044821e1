"""Accounts: the CSV import checks every row (pure), and the real CLI loads the good ones onto
the compacted `accounts` topic of a real broker (exit 1 when a row was bad, 2 when the file is unusable)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import settings_env, supportlens_cmd
from supportlens.accounts import COLUMNS, parse_accounts, read_accounts
from supportlens.contracts import Account, Contact, decode
from supportlens.errors import UserError
from supportlens.topic_reader import read_range
from supportlens.topics import provision

ROOT = Path(__file__).resolve().parent.parent
HEADER = ",".join(c for c in COLUMNS if c != "service_manager")  # an optional column: files without it stay valid


def _parse(*rows: str, header: str = HEADER):
    text = "".join(line + "\n" for line in (header, *rows))
    return parse_accounts(text.splitlines(keepends=True))  # as a file yields them


def _problems(*rows: str) -> list[str]:
    return [str(p) for p in _parse(*rows).problems]


def test_the_example_file_is_valid_and_complete():
    with (ROOT / "deploy" / "examples" / "accounts.csv").open(encoding="utf-8-sig", newline="") as handle:
        parsed = parse_accounts(handle)
    assert parsed.problems == []
    by_id = {account.account_id: account for _, account in parsed.accounts}
    assert by_id["acct-00002"] == Account(
        account_id="acct-00002", name="星河零售", tier="vip", locale="zh-CN", channel="email",
        contacts=[Contact(name="运维值班", email="oncall@xinghe.example"), Contact(email="it@xinghe.example")])
    assert by_id["acct-00004"].name == "Lumen Labs, Inc."  # a quoted comma stays in the value
    assert by_id["acct-00003"] == Account(account_id="acct-00003", name="Blue Fin Travel")


def test_an_accounts_service_manager_is_an_optional_address():
    header = ",".join(COLUMNS)
    parsed = _parse("a-1,Acme,vip,en,none,,,sm@vendor.example", "a-2,Bee,vip,en,none,,,", header=header)
    assert [a.service_manager for _, a in parsed.accounts] == ["sm@vendor.example", ""]
    [problem] = _parse("a-3,Cee,vip,en,none,,,not an address", header=header).problems
    assert problem.column == "service_manager" and problem.line == 2


def test_a_good_row_becomes_the_contract_record_with_defaults_and_kind_normalization():
    parsed = _parse("a-1, Acme ,VIP,ZH-cn,Webhook,https://h.example/x, ops@a.example ; Ann <ann@a.example>",
                    "a-2,,,,,,")
    assert parsed.problems == []
    (line1, acme), (line2, bare) = parsed.accounts
    assert (line1, line2) == (2, 3)
    assert acme == Account(account_id="a-1", name="Acme", tier="vip", locale="zh-CN", channel="webhook",
                           webhook_url="https://h.example/x",
                           contacts=[Contact(email="ops@a.example"), Contact(name="Ann", email="ann@a.example")])
    assert bare == Account(account_id="a-2")  # tier standard, locale en, channel none


def test_columns_may_come_in_any_order_and_some_may_be_left_out():
    parsed = _parse("vip,a-1", header="tier,account_id")
    assert [a for _, a in parsed.accounts] == [Account(account_id="a-1", tier="vip")]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("a-1,A,gold,en,none,,", "line 2: `tier`: invalid enum value 'gold'; use vip or standard"),
        ("a-1,A,vip,fr,none,,", "line 2: `locale`: invalid enum value 'fr'; use en or zh-CN"),
        ("a-1,A,vip,en,pager,,", "line 2: `channel`: invalid enum value 'pager'; use webhook, email or none"),
        ("a 1,A,vip,en,none,,", "line 2: `account_id`: 'a 1' is not 1–128 visible ASCII characters, no spaces"),
        (",A,vip,en,none,,", "line 2: `account_id`: is empty; every account needs an id"),
        ("a-1,A,vip,en,webhook,,", "line 2: `webhook_url`: is empty, but channel is webhook"),
        ("a-1,A,vip,en,email,https://h.example,", "line 2: `contact_emails`: is empty, but channel is email"),
        ("a-1,A,vip,en,webhook,ftp://h.example,", "line 2: `webhook_url`: 'ftp://h.example' is not an http:// or https:// URL"),
        ("a-1,A,vip,en,email,,ops@a.example;not-an-address",
         "line 2: `contact_emails`: address 2 ('not-an-address') is not an e-mail address"),
        ("a-1,A,vip,en,email,,Ann <ann at example>", "line 2: `contact_emails`: address 1"),
        ("a-1," + "n" * 300 + ",vip,en,none,,", "line 2: `name`: is longer than 256 characters"),
        ("a-" + "1" * 200 + ",A,vip,en,none,,", "line 2: `account_id`: is longer than 128 characters"),
        ("a-1,A,vip,en,email,," + ";".join(f"o{i}@a.example" for i in range(21)),
         "line 2: `contact_emails`: is longer than 20 entries"),
        ("a-1,A,vip", "line 2: has 3 fields, the header has 7"),
        ("a-1,A,vip,en,none,,,extra", "line 2: has 8 fields, the header has 7"),
        ('a-1,"never closed,vip,en,none,,', "line 2: cannot be read as CSV"),
        ("a-1," + "x" * 200_000 + ",vip,en,none,,", "line 2: cannot be read as CSV (field larger than field limit"),
    ],
)
def test_each_bad_row_is_named_with_line_field_and_problem(row, expected):
    problems = _problems(row)
    assert any(p.startswith(expected) for p in problems), problems
    assert "regex" not in " ".join(problems)  # plain words, not msgspec's


def test_every_bad_field_of_a_row_is_named_and_good_rows_around_it_are_kept():
    parsed = _parse("a-1,A,vip,en,none,,", "a 2,B,gold,fr,email,ftp://x,nope", "", "a-3,C,standard,en,none,,")
    assert [a.account_id for _, a in parsed.accounts] == ["a-1", "a-3"]
    assert [(p.line, p.column) for p in parsed.problems] == [
        (3, "account_id"), (3, "tier"), (3, "locale"), (3, "webhook_url"), (3, "contact_emails")]
    assert parsed.bad_rows == 1
    assert parsed.accounts[1][0] == 5  # the blank line counts as a line


def test_a_repeated_account_id_keeps_the_first_line():
    parsed = _parse("a-1,First,vip,en,none,,", "a-1,Second,standard,en,none,,")
    assert [a.name for _, a in parsed.accounts] == ["First"]
    assert [str(p) for p in parsed.problems] == ["line 3: `account_id`: 'a-1' is already on line 2; only that line is imported"]


def test_line_numbers_count_physical_lines_of_quoted_multiline_values():
    parsed = _parse('a-1,"two\nlines",vip,en,none,,', "a-2,B,gold,en,none,,")
    assert [str(p).split(":")[0] for p in parsed.problems] == ["line 4"]


def test_hostile_values_never_pass_or_crash():
    parsed = _parse("a-1\x00,A,vip,en,none,,", "a-2,A\x00B,vip,en,none,,", "a-3,=cmd|' /C calc'!A0,vip,en,none,,",
                    "a-4,A,vip,en,webhook,https://h.example/a b,")
    assert {p.line for p in parsed.problems} == {2, 5}
    # text in a name is only text: kept as given (it is never evaluated), within the contract's limits
    assert [a.account_id for _, a in parsed.accounts] == ["a-2", "a-3"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "is empty"),
        (["a-1,A,vip,en,none,,\n"], "is not a header naming the columns"),
        (["account_id,name,tier,contact_email\n"], "unknown column in the file: 'contact_email'"),
        (["account_id,name,name\n"], "column 'name' appears twice"),
    ],
)
def test_a_file_that_is_not_an_accounts_csv_is_refused_as_a_whole(lines, message):
    with pytest.raises(UserError, match=message) as caught:
        parse_accounts(lines)
    assert HEADER in caught.value.hint


def _cli(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(supportlens_cmd("accounts", *args), env=settings_env(settings), capture_output=True,
                          text=True, timeout=120)


def test_cli_refuses_a_missing_file_or_headerless_csv_with_exit_2(tmp_path):
    from supportlens.config import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:1", state_dir=tmp_path)
    missing = _cli(settings, "import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "error:" in missing.stderr and "does not exist" in missing.stderr
    assert "hint:" in missing.stderr and "Traceback" not in missing.stderr
    headerless = tmp_path / "accounts.csv"
    headerless.write_text("acct-1,A,vip,en,none,,\n")
    refused = _cli(settings, "import", str(headerless))
    assert refused.returncode == 2 and "not a header naming the columns" in refused.stderr
    assert HEADER in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.kafka
def test_cli_imports_the_good_rows_to_the_compacted_topic_and_names_the_bad(settings, tmp_path):
    provision(settings)
    path = tmp_path / "accounts.csv"
    path.write_text(
        (ROOT / "deploy" / "examples" / "accounts.csv").read_text()
        + "acct-bad,Bad Tier,gold,en,none,,\n"
        + "acct-00003,Blue Fin Travel,vip,en,email,,ops@bluefin.example\n"  # a repeat: only the first counts
        + "acct-00005,Quiet Co,standard,en,none,,\n"
    )
    done = _cli(settings, "import", str(path))
    assert done.returncode == 1, done.stderr
    assert "line 6: `tier`: invalid enum value 'gold'" in done.stderr
    assert "line 7: `account_id`: 'acct-00003' is already on line 4" in done.stderr
    assert "imported 5 accounts (3 VIP)" in done.stdout
    assert "Traceback" not in done.stderr

    messages = list(read_range(settings, [settings.topic("accounts")]))
    by_key = {m.key().decode(): decode(m.value(), Account) for m in messages}
    assert len(messages) == 5 and set(by_key) == {f"acct-0000{i}" for i in range(1, 6)}
    assert all(account.account_id == key for key, account in by_key.items())
    assert by_key["acct-00001"].webhook_url == "https://hooks.acme.example/supportlens"

    # importing again replaces, never doubles, what the pipeline sees as a table
    assert _cli(settings, "import", str(path)).returncode == 1
    assert [a.account_id for a in read_accounts(settings)] == [f"acct-0000{i}" for i in range(1, 6)]
    listed = _cli(settings, "list", "--vip")
    assert listed.returncode == 0 and "acct-00002" in listed.stdout and "acct-00005" not in listed.stdout


@pytest.mark.kafka
def test_cli_says_when_kafka_has_no_accounts_topic(settings, tmp_path):
    done = _cli(settings, "import", str(ROOT / "deploy" / "examples" / "accounts.csv"))
    assert done.returncode == 2
    assert "missing topics" in done.stderr and "supportlens topics create" in done.stderr
