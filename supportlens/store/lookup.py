"""Support lookups: what happened to a customer, a request, a report; the top problems.

The CLI and the HTTP API call these same functions. Inputs are checked here, in the
user's words (:class:`LookupInputError`), before any query runs; every value reaches
ClickHouse as a bound query parameter, never formatted into SQL. Only identifiers from
the fixed tables below (never user text) are placed in SQL.
"""

from __future__ import annotations

import ipaddress
import re
import time
from datetime import datetime, timezone
from typing import Literal

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.errors import UserError
from supportlens.store import misuse
from supportlens.store.misuse import MisuseHit
from supportlens.store.paths import PathStep, path_before

KeyKind = Literal["ip", "user", "account"]
KEY_COLUMNS: dict[str, str] = {"ip": "client_ip", "user": "user_id", "account": "account_id"}
TOP_DIMENSIONS: dict[str, str] = {
    "service": "service",
    "region": "region",
    "network": "isp",
    "connection": "connection_type",
    "app_version": "app_version",
    "platform": "platform",
}
MAX_SPAN_S = 400 * 86_400  # the longest retention of any table
MAX_LIMIT = 10_000
_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_DURATION = re.compile(r"^\s*(\d{1,6})\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class LookupInputError(UserError):
    """A lookup input a person got wrong; the message says which and how."""


# -- inputs (pure) ---------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """``30m``, ``24h``, ``7d``, ``2w`` → seconds."""
    match = _DURATION.match(text or "")
    if not match:
        raise LookupInputError(f"{text[:40]!r} is not a duration", hint="write it like 30m, 24h, 7d or 2w")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_SPAN_S:
        raise LookupInputError(f"{text!r} is out of range", hint="between 1s and 400d")
    return seconds


def parse_until(text: str | None, now_us: int | None = None) -> int:
    """The end of a lookup window: ``now`` (default), an ISO time, or a duration ago (``2h``)."""
    now_us = now_us if now_us is not None else time.time_ns() // 1000
    if text is None or text.strip() in ("", "now"):
        return now_us
    if _DURATION.match(text):
        return now_us - parse_duration(text) * 1_000_000
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise LookupInputError(f"{text[:40]!r} is not a time", hint="use now, an ISO time like 2026-11-22T08:00Z, or 2h (ago)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1_000_000)


def check_key(kind: str, value: str) -> str:
    """A client IP (v4 or v6, normalized) or a user/account/request/report id."""
    if kind == "ip":
        try:
            return str(ipaddress.ip_address((value or "").strip()))
        except ValueError:
            raise LookupInputError(f"{value[:64]!r} is not an IP address", hint="e.g. 203.0.113.7 or 2001:db8::1") from None
    if not _ID.match(value or ""):
        raise LookupInputError(
            f"{value[:64]!r} is not a valid {kind} id",
            hint="ids are 1–128 visible ASCII characters without spaces",
        )
    return value


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise LookupInputError(f"limit {limit} is out of range", hint=f"between 1 and {MAX_LIMIT}")
    return limit


# -- results -----------------------------------------------------------------------------


class TimelineEntry(msgspec.Struct, frozen=True, kw_only=True):
    at_us: int
    kind: Literal["request", "report"]
    id: str
    what: str
    diagnosis_class: str
    service: str
    status: str
    duration_us: int
    detail: str
    client_ip: str
    user_id: str
    account_id: str
    drill: bool = False
    region: str = ""
    network: str = ""
    app_version: str = ""
    platform: str = ""
    surfaced_as: str = ""  # a report traced to an earlier misuse: the class its failure looked like
    misuse_detection_id: str = ""

    def dimension(self, name: str) -> str:
        """This entry's value in an incident dimension (names as surges and incidents use them)."""
        return {"service": self.service, "diagnosis_class": self.diagnosis_class, "region": self.region,
                "network": self.network, "app_version": self.app_version, "platform": self.platform}.get(name, "")


FAILED_CLASSES = frozenset({"network_unreachable", "network_slow", "server_error", "server_slow",
                            "client_misuse", "client_crash"})


def fell_into(entry: TimelineEntry, dimensions: dict[str, str], started_us: int, resolved_us: int | None) -> bool:
    """Did this failed request fall into an incident of these dimensions and times? (pure)"""
    return (
        entry.kind == "request"
        and entry.diagnosis_class in FAILED_CLASSES
        and started_us <= entry.at_us < (resolved_us if resolved_us is not None else 2**63)
        and all(entry.dimension(name) == value for name, value in dimensions.items())
    )


class IncidentHit(msgspec.Struct, frozen=True, kw_only=True):
    """An incident a customer fell into, and how many of their failed requests it covers."""

    incident_id: str
    title: str
    severity: str
    state: str
    started_at_us: int
    resolved_at_us: int | None
    root_key: str
    requests: int


class Timeline(msgspec.Struct, frozen=True, kw_only=True):
    key_kind: str
    key: str
    since_us: int
    until_us: int
    requests: int  # in the window, also beyond the limit
    failed: int
    reports: int
    entries: list[TimelineEntry]  # newest first, at most `limit` of each kind
    incidents: list[IncidentHit] = []
    misuse: list[MisuseHit] = []  # found in the customer's sequences in the window, or explaining a report of it


class ChainSpan(msgspec.Struct, frozen=True, kw_only=True):
    side: str
    service: str
    operation: str
    span_id: str
    parent_span_id: str
    offset_us: int  # from the request's first span
    duration_us: int
    status: str
    http_status: int
    error_code: str


class RequestChain(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    found: bool
    start_us: int = 0
    operation: str = ""
    client_ip: str = ""
    user_id: str = ""
    account_id: str = ""
    app_version: str = ""
    platform: str = ""
    region: str = ""
    network: str = ""
    completeness: str = ""
    version: int = 0
    diagnosis_class: str = ""
    diagnosis_service: str = ""
    diagnosis_team: str = ""
    diagnosis_code: str = ""
    evidence: str = ""
    spans: list[ChainSpan] = []
    reports: list[str] = []


class ReportDetail(msgspec.Struct, frozen=True, kw_only=True):
    report_id: str
    found: bool
    received_at_us: int = 0
    client_ip: str = ""
    user_id: str = ""
    account_id: str = ""
    locale: str = ""
    app_version: str = ""
    platform: str = ""
    region: str = ""
    error_code: str = ""
    user_message: str = ""
    request_ids: list[str] = []
    diagnosed: bool = False
    diagnosis_class: str = ""
    diagnosis_service: str = ""
    diagnosis_team: str = ""
    diagnosis_code: str = ""
    surfaced_as: str = ""  # traced to an earlier misuse: the class the failure looked like on its own
    misuse_detection_id: str = ""
    misuse: MisuseHit | None = None  # that detection, once the sink has stored it
    title: str = ""
    explanation: str = ""
    action: str = ""
    doc_url: str = ""
    path: list[PathStep] = []  # the user's consented behaviour and requests in the 10 minutes before


class ProblemRow(msgspec.Struct, frozen=True, kw_only=True):
    diagnosis_class: str
    value: str
    requests: int
    users: int
    share: float  # of all requests in the window


class TopProblems(msgspec.Struct, frozen=True, kw_only=True):
    by: str
    since_us: int
    until_us: int
    rows: list[ProblemRow]


# -- queries -----------------------------------------------------------------------------

_WINDOW = "start >= fromUnixTimestamp64Micro({since:Int64}) AND start < fromUnixTimestamp64Micro({until:Int64})"


def timeline(client: Client, kind: str, key: str, since_us: int, until_us: int, limit: int = 200) -> Timeline:
    """A customer's requests and fault reports in a window, newest first."""
    if kind not in KEY_COLUMNS:
        raise LookupInputError(f"cannot look up by {kind!r}", hint="by ip, user or account")
    key = check_key(kind, key)
    limit = check_limit(limit)
    params = {"kind": kind, "key": key, "since": since_us, "until": until_us, "limit": limit}
    ids = f"SELECT request_id FROM request_index WHERE key_kind = {{kind:String}} AND key = {{key:String}} AND {_WINDOW}"
    # Not FINAL: FINAL cannot skip day partitions, so every part would be searched for every id.
    # The window (with an hour's slack for versions that learnt an earlier start) prunes the
    # partitions, and LIMIT 1 BY keeps each request's highest version, as FINAL would.
    latest = (
        f"SELECT * FROM requests WHERE request_id IN ({ids}) "
        "AND start >= fromUnixTimestamp64Micro({since:Int64}) - INTERVAL 1 HOUR "
        "AND start < fromUnixTimestamp64Micro({until:Int64}) + INTERVAL 1 HOUR "
        "ORDER BY request_id, version DESC LIMIT 1 BY request_id"
    )
    counts = client.query(
        f"SELECT count(), countIf(diagnosis_class NOT IN ('ok', 'unknown')) FROM ({latest})", parameters=params,
    ).result_rows[0]
    requests = client.query(
        "SELECT toUnixTimestamp64Micro(start), request_id, operation, diagnosis_class, "
        "if(diagnosis_service != '', diagnosis_service, root_service), "
        "if(client_status = 'error' OR server_status = 'error', 'error', 'ok'), "
        "greatest(client_duration_us, server_duration_us), diagnosis_evidence, client_ip, user_id, account_id, drill, "
        "region, isp, app_version, platform "
        f"FROM ({latest}) ORDER BY start DESC LIMIT {{limit:UInt32}}",
        parameters=params,
    ).result_rows
    column = KEY_COLUMNS[kind]
    reports = client.query(
        "SELECT toUnixTimestamp64Micro(r.received_at), r.report_id, r.user_message, d.diagnosis_class, "
        "d.diagnosis_service, d.title, r.client_ip, r.user_id, r.account_id, d.drill, d.diagnosis_surfaced_as, "
        "d.misuse_detection_id "
        f"FROM (SELECT * FROM fault_reports FINAL WHERE {column} = {{key:String}} "
        "AND received_at >= fromUnixTimestamp64Micro({since:Int64}) AND received_at < fromUnixTimestamp64Micro({until:Int64}) "
        "ORDER BY received_at DESC LIMIT {limit:UInt32}) AS r "
        f"LEFT JOIN (SELECT * FROM report_diagnoses FINAL WHERE {column} = {{key:String}}) AS d "
        "ON d.report_id = r.report_id ORDER BY r.received_at DESC",
        parameters=params, settings={"join_use_nulls": 0},
    ).result_rows
    entries = [
        TimelineEntry(at_us=r[0], kind="request", id=r[1], what=r[2], diagnosis_class=r[3], service=r[4],
                      status=r[5], duration_us=r[6], detail=r[7], client_ip=r[8], user_id=r[9],
                      account_id=r[10], drill=bool(r[11]), region=r[12], network=r[13], app_version=r[14],
                      platform=r[15])
        for r in requests
    ] + [
        TimelineEntry(at_us=r[0], kind="report", id=r[1], what=r[2], diagnosis_class=r[3] or "pending",
                      service=r[4], status="diagnosed" if r[3] else "pending", duration_us=0, detail=r[5],
                      client_ip=r[6], user_id=r[7], account_id=r[8], drill=bool(r[9]), surfaced_as=r[10],
                      misuse_detection_id=r[11])
        for r in reports
    ]
    entries.sort(key=lambda e: (e.at_us, e.kind), reverse=True)
    return Timeline(key_kind=kind, key=key, since_us=since_us, until_us=until_us, requests=counts[0],
                    failed=counts[1], reports=len(reports), entries=entries,
                    incidents=_incidents_hit(client, entries, since_us, until_us),
                    misuse=_misuse_of(client, kind, key, entries, since_us, until_us, limit))


def _misuse_of(client: Client, kind: str, key: str, entries: list[TimelineEntry], since_us: int, until_us: int,
               limit: int) -> list[MisuseHit]:
    """The customer's detections: a user's or an account's own; for an IP, those of the users
    seen from it (a detection carries no address)."""
    traced = [e.misuse_detection_id for e in entries if e.misuse_detection_id]
    if kind == "ip":
        users = sorted({e.user_id for e in entries if e.user_id})
        hits = misuse.detections(client, "user", users, since_us, until_us, traced, limit)
    else:
        hits = misuse.detections(client, "account" if kind == "account" else "user", [key], since_us, until_us,
                                 traced, limit)
    return misuse.with_reports(hits, traced)


def _incidents_hit(client: Client, entries: list[TimelineEntry], since_us: int, until_us: int) -> list[IncidentHit]:
    """The incidents of the window that the customer's failed requests fell into."""
    if not any(e.kind == "request" and e.diagnosis_class in FAILED_CLASSES for e in entries):
        return []
    rows = client.query(
        "SELECT incident_id, title, severity, state, toUnixTimestamp64Micro(started_at), "
        "if(resolved_at IS NULL, NULL, toUnixTimestamp64Micro(assumeNotNull(resolved_at))), root_key, dimensions "
        "FROM incidents_current WHERE started_at < fromUnixTimestamp64Micro({until:Int64}) "
        "AND (resolved_at IS NULL OR resolved_at >= fromUnixTimestamp64Micro({since:Int64})) AND NOT drill "
        "ORDER BY started_at DESC LIMIT 1000",
        parameters={"since": since_us, "until": until_us},
    ).result_rows
    hits = []
    for incident_id, title, severity, state, started, resolved, root_key, dimensions in rows:
        covered = sum(fell_into(e, dict(dimensions), started, resolved) for e in entries)
        if covered:
            hits.append(IncidentHit(incident_id=incident_id, title=title, severity=severity, state=state,
                                    started_at_us=started, resolved_at_us=resolved, root_key=root_key,
                                    requests=covered))
    return hits


def request_chain(client: Client, request_id: str) -> RequestChain:
    """One request's call chain: its diagnosis and every span, timed from its first span."""
    request_id = check_key("request", request_id)
    params = {"id": request_id}
    rows = client.query(
        "SELECT toUnixTimestamp64Micro(start), operation, client_ip, user_id, account_id, app_version, platform, "
        "region, concat(isp, if(connection_type != '', concat(' / ', connection_type), '')), completeness, version, "
        "diagnosis_class, diagnosis_service, diagnosis_team, diagnosis_code, diagnosis_evidence "
        "FROM requests FINAL WHERE request_id = {id:String}", parameters=params,
    ).result_rows
    spans = client.query(
        "SELECT side, service, operation, span_id, parent_span_id, toUnixTimestamp64Micro(start), duration_us, "
        "status, http_status, error_code FROM spans FINAL WHERE request_id = {id:String} "
        "ORDER BY start, side", parameters=params,
    ).result_rows
    reports = [r[0] for r in client.query(
        "SELECT report_id FROM fault_reports FINAL WHERE has(request_ids, {id:String}) ORDER BY received_at LIMIT 100",
        parameters=params,
    ).result_rows]
    if not rows and not spans:
        return RequestChain(request_id=request_id, found=False, reports=reports)
    origin = min([s[5] for s in spans] + ([rows[0][0]] if rows else []))
    chain = [
        ChainSpan(side=s[0], service=s[1], operation=s[2], span_id=s[3], parent_span_id=s[4],
                  offset_us=s[5] - origin, duration_us=s[6], status=s[7], http_status=s[8], error_code=s[9])
        for s in spans
    ]
    if not rows:  # spans stored, request not yet correlated
        return RequestChain(request_id=request_id, found=True, start_us=origin, spans=chain, reports=reports)
    r = rows[0]
    return RequestChain(
        request_id=request_id, found=True, start_us=r[0], operation=r[1], client_ip=r[2], user_id=r[3],
        account_id=r[4], app_version=r[5], platform=r[6], region=r[7], network=r[8], completeness=r[9],
        version=r[10], diagnosis_class=r[11], diagnosis_service=r[12], diagnosis_team=r[13],
        diagnosis_code=r[14], evidence=r[15], spans=chain, reports=reports,
    )


def report_detail(client: Client, report_id: str) -> ReportDetail:
    """A fault report as the user sent it, and the diagnosis they were answered with."""
    report_id = check_key("report", report_id)
    params = {"id": report_id}
    rows = client.query(
        "SELECT toUnixTimestamp64Micro(received_at), client_ip, user_id, account_id, locale, app_version, platform, "
        "region, error_code, user_message, request_ids FROM fault_reports FINAL WHERE report_id = {id:String}",
        parameters=params,
    ).result_rows
    diagnoses = client.query(
        "SELECT diagnosis_class, diagnosis_service, diagnosis_team, title, explanation, action, doc_url, "
        "toUnixTimestamp64Micro(received_at), client_ip, user_id, account_id, locale, request_ids, "
        "diagnosis_code, diagnosis_surfaced_as, misuse_detection_id "
        "FROM report_diagnoses FINAL WHERE report_id = {id:String}", parameters=params,
    ).result_rows
    if not rows and not diagnoses:
        return ReportDetail(report_id=report_id, found=False)
    d = diagnoses[0] if diagnoses else None
    if rows:
        r = rows[0]
        base = dict(received_at_us=r[0], client_ip=r[1], user_id=r[2], account_id=r[3], locale=r[4],
                    app_version=r[5], platform=r[6], region=r[7], error_code=r[8], user_message=r[9],
                    request_ids=list(r[10]))
    else:
        assert d is not None
        base = dict(received_at_us=d[7], client_ip=d[8], user_id=d[9], account_id=d[10], locale=d[11],
                    request_ids=list(d[12]))
    diagnosis = dict(diagnosed=True, diagnosis_class=d[0], diagnosis_service=d[1], diagnosis_team=d[2],
                     title=d[3], explanation=d[4], action=d[5], doc_url=d[6], diagnosis_code=d[13],
                     surfaced_as=d[14], misuse_detection_id=d[15], misuse=misuse.detection(client, d[15])) if d else {}
    before = path_before(client, str(base.get("user_id", "")), int(base["received_at_us"]))  # type: ignore[arg-type]
    return ReportDetail(report_id=report_id, found=True, **base, **diagnosis, path=before)


def top_problems(client: Client, by: str, since_us: int, until_us: int, limit: int = 20,
                 include_drills: bool = False) -> TopProblems:
    """The problem classes that hit the most users in a window, by one dimension."""
    if by not in TOP_DIMENSIONS:
        raise LookupInputError(f"cannot group by {by!r}", hint=f"by one of {', '.join(TOP_DIMENSIONS)}")
    limit = check_limit(limit)
    column = TOP_DIMENSIONS[by]
    rows = client.query(
        f"SELECT diagnosis_class, {column} AS value, uniqMerge(requests), uniqMerge(users) FROM problem_trends "
        "WHERE minute >= toStartOfMinute(fromUnixTimestamp64Micro({since:Int64})) "
        "AND minute < fromUnixTimestamp64Micro({until:Int64}) AND (drill = 0 OR {drills:Bool}) "
        "GROUP BY diagnosis_class, value",
        parameters={"since": since_us, "until": until_us, "drills": include_drills},
    ).result_rows
    total = sum(requests for _, _, requests, _ in rows)
    problems = [
        ProblemRow(diagnosis_class=cls, value=value, requests=requests, users=users,
                   share=requests / total if total else 0.0)
        for cls, value, requests, users in rows
        if cls != "ok"
    ]
    problems.sort(key=lambda p: (p.users, p.requests, p.diagnosis_class, p.value), reverse=True)
    return TopProblems(by=by, since_us=since_us, until_us=until_us, rows=problems[:limit])
