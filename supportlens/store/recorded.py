"""The recorded traffic of a past incident, read back as event records (for drills).

:func:`recorded_incident` finds an incident; :func:`recorded_spans` and
:func:`recorded_reports` page through the spans and fault reports of a time window in
event-time order, rebuilt as :class:`~supportlens.contracts.Span` and
:class:`~supportlens.contracts.FaultReport`. Pages are keyset-paged (``after`` is the
opaque position the previous page ended at), so memory stays bounded by ``limit`` however
long the window. Records already marked as a drill are left out: a drill replays real
traffic, never an earlier drill.

What the tables do not keep cannot come back: attribute values return as text (the
tables hold ``Map(String, String)``); ``schema_version`` is the current one; a report's
``client_log`` is rebuilt from the client spans the gateway stored for it (attribute
``attached_to_report``), so a report written to Kafka without the gateway comes back
without its log (``client_log_spans`` says how long it was).

Every value reaches ClickHouse as a bound parameter.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
from clickhouse_connect.driver.client import Client

from supportlens.contracts import DRILL_ATTRIBUTE, FaultReport, Network, Span
from supportlens.store.lookup import MAX_LIMIT, MAX_SPAN_S, LookupInputError, check_key, check_limit

ATTACHED_TO_REPORT = "attached_to_report"  # the gateway's mark on a client span a user sent with a report
LOG_LOOKBACK_US = 3_600_000_000  # how far before a report its attached spans are searched
MAX_LOG = 200  # spans of one client_log (the contract's limit)


class RecordedIncident(msgspec.Struct, frozen=True, kw_only=True):
    """An incident as ``incidents_current`` knows it."""

    incident_id: str
    state: str
    title: str
    severity: str
    root_key: str
    started_at_us: int
    resolved_at_us: int | None
    dimensions: dict[str, str]
    drill: bool


class SpanPage(msgspec.Struct, frozen=True, kw_only=True):
    spans: list[Span]
    next: str = ""  # where the next page starts; "" when this was the last


class RecordedReport(msgspec.Struct, frozen=True, kw_only=True):
    report: FaultReport
    client_log_spans: int  # how many spans its client_log had when it was sent


class ReportPage(msgspec.Struct, frozen=True, kw_only=True):
    reports: list[RecordedReport]
    next: str = ""


_SpanCursor = tuple[int, str, str, str, str]  # start_us, request_id, side, span_id, service
_ReportCursor = tuple[int, str, str]  # received_at_us, report_id, client_ip


def _encode_cursor(values: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(values)).decode()


def _decode_cursor(token: str, shape: Any) -> Any:
    try:
        return msgspec.json.decode(base64.urlsafe_b64decode(token.encode("ascii")), type=shape)
    except (ValueError, msgspec.DecodeError):
        raise LookupInputError("`after` is not a position this API gave out",
                               hint="pass the `next` value of the previous page unchanged") from None


def _check_window(since_us: int, until_us: int) -> None:
    if not since_us < until_us:
        raise LookupInputError("the window ends before it starts", hint="since must be before until")
    if until_us - since_us > MAX_SPAN_S * 1_000_000:
        raise LookupInputError("the window is longer than any table keeps rows", hint="at most 400 days")


def recorded_incident(client: Client, incident_id: str) -> RecordedIncident:
    """The incident, or :class:`LookupInputError` saying it is not recorded."""
    incident_id = check_key("incident", incident_id)
    rows = client.query(
        "SELECT incident_id, state, title, severity, root_key, toUnixTimestamp64Micro(started_at), "
        "if(resolved_at IS NULL, NULL, toUnixTimestamp64Micro(assumeNotNull(resolved_at))), dimensions, drill "
        "FROM incidents_current WHERE incident_id = {id:String}",
        parameters={"id": incident_id},
    ).result_rows
    if not rows:
        raise LookupInputError(f"no incident {incident_id!r} is recorded in ClickHouse",
                               hint="`supportlens incidents --all` lists the incidents")
    r = rows[0]
    return RecordedIncident(incident_id=r[0], state=r[1], title=r[2], severity=r[3], root_key=r[4],
                            started_at_us=r[5], resolved_at_us=r[6], dimensions=dict(r[7]), drill=bool(r[8]))


_SPAN_COLUMNS = (
    "toUnixTimestamp64Micro(start), request_id, side, span_id, service, trace_id, parent_span_id, operation, "
    "duration_us, status, http_status, error_code, error_message, client_ip, user_id, account_id, app_version, "
    "platform, region, isp, asn, connection_type, attributes"
)
_SPAN_KEY = "request_id, side, span_id, service, start"  # the table's ReplacingMergeTree key


def _network(isp: str, asn: int, connection_type: str) -> Network | None:
    return Network(isp=isp, asn=asn, connection_type=connection_type) if isp or asn or connection_type else None


def _span(r: tuple[Any, ...], drop: str = "") -> Span:
    attributes = {k: v for k, v in r[22].items() if k != drop} if drop else dict(r[22])
    return Span(
        start_us=r[0], request_id=r[1], side=r[2], span_id=r[3], service=r[4], trace_id=r[5], parent_span_id=r[6],
        operation=r[7], duration_us=r[8], status=r[9], http_status=r[10] or None, error_code=r[11],
        error_message=r[12], client_ip=r[13], user_id=r[14], account_id=r[15], app_version=r[16], platform=r[17],
        region=r[18], network=_network(r[19], r[20], r[21]), attributes=attributes,
    )


def recorded_spans(client: Client, since_us: int, until_us: int, after: str = "", limit: int = 5000) -> SpanPage:
    """The next ``limit`` spans that started in ``[since_us, until_us)``, in start order, each once."""
    _check_window(since_us, until_us)
    limit = check_limit(limit)
    params: dict[str, Any] = {"since": since_us, "until": until_us, "limit": limit}
    position = ""
    if after:
        c: _SpanCursor = _decode_cursor(after, _SpanCursor)
        params.update(a_start=c[0], a_request=c[1], a_side=c[2], a_span=c[3], a_service=c[4])
        position = ("AND (start, request_id, side, span_id, service) > (fromUnixTimestamp64Micro({a_start:Int64}), "
                    "{a_request:String}, {a_side:String}, {a_span:String}, {a_service:String}) ")
    # Not FINAL: it cannot skip day partitions. A re-delivered copy has the same key, so
    # LIMIT 1 BY drops it inside a page, and the strict `>` of the position across pages.
    rows = client.query(
        f"SELECT {_SPAN_COLUMNS} FROM spans "
        "WHERE start >= fromUnixTimestamp64Micro({since:Int64}) AND start < fromUnixTimestamp64Micro({until:Int64}) "
        f"AND attributes['{DRILL_ATTRIBUTE}'] != 'true' {position}"
        "ORDER BY start, request_id, side, span_id, service "
        f"LIMIT 1 BY {_SPAN_KEY} LIMIT {{limit:UInt32}}",
        parameters=params,
    ).result_rows
    spans = [_span(r) for r in rows]
    last = rows[-1] if len(rows) == limit else None
    return SpanPage(spans=spans, next=_encode_cursor((last[0], last[1], last[2], last[3], last[4])) if last else "")


def recorded_reports(client: Client, since_us: int, until_us: int, after: str = "", limit: int = 200) -> ReportPage:
    """The next ``limit`` fault reports received in ``[since_us, until_us)``, in time order, each once,
    with the client logs the gateway stored for them."""
    _check_window(since_us, until_us)
    limit = min(check_limit(limit), MAX_LIMIT // 10)  # each report may bring 200 spans of log
    params: dict[str, Any] = {"since": since_us, "until": until_us, "limit": limit}
    position = ""
    if after:
        c: _ReportCursor = _decode_cursor(after, _ReportCursor)
        params.update(a_at=c[0], a_report=c[1], a_ip=c[2])
        position = ("AND (received_at, report_id, client_ip) > (fromUnixTimestamp64Micro({a_at:Int64}), "
                    "{a_report:String}, {a_ip:String}) ")
    rows = client.query(
        "SELECT toUnixTimestamp64Micro(received_at), report_id, client_ip, user_id, account_id, locale, app_version, "
        "platform, region, isp, asn, connection_type, request_ids, error_code, user_message, client_log_spans, "
        "attributes FROM fault_reports "
        "WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND received_at < fromUnixTimestamp64Micro({until:Int64}) "
        f"AND attributes['{DRILL_ATTRIBUTE}'] != 'true' {position}"
        "ORDER BY received_at, report_id, client_ip LIMIT 1 BY received_at, report_id, client_ip "
        "LIMIT {limit:UInt32}",
        parameters=params,
    ).result_rows
    logs = _attached_logs(client, [r[1] for r in rows], rows[0][0], rows[-1][0]) if rows else {}
    reports = [
        RecordedReport(
            report=FaultReport(
                received_at_us=r[0], report_id=r[1], client_ip=r[2], user_id=r[3], account_id=r[4], locale=r[5],
                app_version=r[6], platform=r[7], region=r[8], network=_network(r[9], r[10], r[11]),
                request_ids=list(r[12]), error_code=r[13], user_message=r[14],
                client_log=logs.get(r[1], [])[:MAX_LOG], attributes=dict(r[16]),
            ),
            client_log_spans=r[15],
        )
        for r in rows
    ]
    last = rows[-1] if len(rows) == limit else None
    return ReportPage(reports=reports, next=_encode_cursor((last[0], last[1], last[2])) if last else "")


def _attached_logs(client: Client, report_ids: list[str], first_us: int, last_us: int) -> dict[str, list[Span]]:
    """The client spans the gateway stored for these reports, per report, in start order, without
    the gateway's mark (the report's own log never carried it)."""
    rows = client.query(
        f"SELECT {_SPAN_COLUMNS}, attributes['{ATTACHED_TO_REPORT}'] AS report FROM spans "
        "WHERE start >= fromUnixTimestamp64Micro({lo:Int64}) AND start <= fromUnixTimestamp64Micro({hi:Int64}) "
        f"AND side = 'client' AND has({{ids:Array(String)}}, attributes['{ATTACHED_TO_REPORT}']) "
        f"ORDER BY report, start, request_id, span_id, service LIMIT 1 BY report, {_SPAN_KEY}",
        parameters={"lo": first_us - LOG_LOOKBACK_US, "hi": last_us, "ids": report_ids},
    ).result_rows
    logs: dict[str, list[Span]] = {}
    for r in rows:
        logs.setdefault(r[23], []).append(_span(r, drop=ATTACHED_TO_REPORT))
    return logs
