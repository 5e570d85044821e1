"""The account report's figures (issue #16): one customer over a week or a month, for the service
manager who reviews it with them. Their requests and failure share against everyone's, the
incidents that touched them and when they were told, their misuse patterns and the advice
they got, and their reports that still need a person. Drills left out.
"""

from __future__ import annotations

from datetime import date

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.store.daily import DAY_US, Count
from supportlens.store.lookup import LookupInputError
from supportlens.store.perception import day_start_us, period_days


class Notice(msgspec.Struct, frozen=True):
    incident_id: str
    title: str
    root_key: str
    told_at_us: int | None  # incident_declared sent to the account
    followed_up_at_us: int | None  # incident_resolved


class OpenReport(msgspec.Struct, frozen=True):
    report_id: str
    received_at_us: int
    diagnosis_class: str  # "" while undiagnosed


class AccountFigures(msgspec.Struct, frozen=True):
    account_id: str
    period: str
    first_day: str
    last_day: str
    requests: int
    failed_requests: int
    everyone_requests: int
    everyone_failed: int
    reports: int
    notices: list[Notice]
    misuse: list[Count]  # error code of their misused calls, and how many
    advice: list[str]  # subjects of the advice sent
    open_reports: list[OpenReport]


def account_figures(client: Client, account_id: str, period: str, day: date) -> AccountFigures:
    first, last = period_days(period, day)
    window = {"since": day_start_us(first), "until": day_start_us(last) + DAY_US, "account": account_id}
    known = client.query(
        "SELECT (SELECT count() FROM request_index WHERE key_kind = 'account' AND key = {account:String}) + "
        "(SELECT count() FROM fault_reports WHERE account_id = {account:String}) + "
        "(SELECT count() FROM notifications WHERE account_id = {account:String})", parameters=window).result_rows[0][0]
    if not known:
        raise LookupInputError(f"no account {account_id!r} in the store", hint="account ids look like acct-00001")
    in_window = ("start >= fromUnixTimestamp64Micro({since:Int64}) AND start < fromUnixTimestamp64Micro({until:Int64}) "
                 "AND NOT drill")
    mine, mine_failed = client.query(
        "SELECT count(), countIf(cls != 'ok') FROM (SELECT request_id, argMax(diagnosis_class, version) AS cls "
        f"FROM requests WHERE account_id = {{account:String}} AND {in_window} GROUP BY request_id)",
        parameters=window).result_rows[0]
    everyone, everyone_failed = client.query(
        "SELECT uniqMerge(requests), uniqMergeIf(requests, diagnosis_class != 'ok') FROM problem_trends "
        "WHERE minute >= fromUnixTimestamp64Micro({since:Int64}) AND minute < fromUnixTimestamp64Micro({until:Int64}) "
        "AND NOT drill", parameters=window).result_rows[0]
    notices = [Notice(*row) for row in client.query(
        "SELECT n.incident_id, any(c.title), any(c.root_key), "
        "minIf(toUnixTimestamp64Micro(n.created_at), n.kind = 'incident_declared'), "
        "minIf(toUnixTimestamp64Micro(n.created_at), n.kind = 'incident_resolved') "
        "FROM notifications AS n FINAL LEFT JOIN incidents_current AS c ON c.incident_id = n.incident_id "
        "WHERE n.account_id = {account:String} AND n.kind IN ('incident_declared', 'incident_resolved') AND NOT n.drill "
        "AND n.created_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND n.created_at < fromUnixTimestamp64Micro({until:Int64}) GROUP BY n.incident_id ORDER BY 4",
        parameters=window, settings={"join_use_nulls": 1}).result_rows]
    notices = [msgspec.structs.replace(n, told_at_us=n.told_at_us or None, followed_up_at_us=n.followed_up_at_us or None)
               for n in notices]
    misuse = [Count(*row) for row in client.query(
        "SELECT code, count() AS n FROM (SELECT request_id, argMax(diagnosis_code, version) AS code, "
        "argMax(diagnosis_class, version) AS cls FROM requests "
        f"WHERE account_id = {{account:String}} AND {in_window} GROUP BY request_id) "
        "WHERE cls = 'client_misuse' GROUP BY code ORDER BY n DESC, code", parameters=window).result_rows]
    advice = [row[0] for row in client.query(
        "SELECT subject FROM notifications FINAL WHERE account_id = {account:String} AND kind = 'misuse_advice' "
        "AND NOT drill AND created_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND created_at < fromUnixTimestamp64Micro({until:Int64}) ORDER BY created_at", parameters=window).result_rows]
    reports = client.query(
        "SELECT r.report_id, toUnixTimestamp64Micro(r.received_at), d.diagnosis_class FROM fault_reports AS r FINAL "
        "LEFT JOIN (SELECT report_id, diagnosis_class FROM report_diagnoses FINAL WHERE account_id = {account:String}) "
        "AS d USING report_id WHERE r.account_id = {account:String} "
        "AND r.received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND r.received_at < fromUnixTimestamp64Micro({until:Int64}) "
        "AND lower(r.attributes['supportlens.drill']) != 'true' ORDER BY r.received_at",
        parameters=window, settings={"join_use_nulls": 1}).result_rows
    open_reports = [OpenReport(rid, at, cls or "") for rid, at, cls in reports if cls in (None, "", "unknown")]
    return AccountFigures(account_id=account_id, period=period, first_day=first.isoformat(), last_day=last.isoformat(),
                          requests=mine, failed_requests=mine_failed, everyone_requests=everyone,
                          everyone_failed=everyone_failed, reports=len(reports), notices=notices, misuse=misuse,
                          advice=advice, open_reports=open_reports)
