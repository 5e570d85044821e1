"""Diagnosis (DESIGN.md §4) as pure functions over spans, requests and reports.

Precedence, first match wins: a server error (5xx anywhere in the chain, blamed on the
deepest failing hop), a catalogued misuse (4xx with a known code), a client crash, a
request that never reached us, a slow server, a slow network, else ok. A 4xx with a
code the catalog does not know is ``unknown``: we do not tell a customer they misused
something we cannot name.
"""

from __future__ import annotations

from supportlens.contracts import CorrelatedRequest, Diagnosis, DiagnosedReport, FaultReport, Span
from streams.catalog import Catalog


def _callee_time_us(servers: list[Span]) -> dict[str, int]:
    """Per span id, the summed duration of the calls that span made (its children)."""
    total: dict[str, int] = {}
    for s in servers:
        if s.parent_span_id and s.parent_span_id != s.span_id:
            total[s.parent_span_id] = total.get(s.parent_span_id, 0) + s.duration_us
    return total


def _deepest(failing: list[Span]) -> Span:
    """The failing hop none of whose callees failed: where the error started."""
    ids = {s.span_id for s in failing}
    parents = {s.parent_span_id for s in failing if s.parent_span_id in ids}
    leaves = [s for s in failing if s.span_id not in parents]
    return min(leaves or failing, key=lambda s: (-s.start_us, s.service))


def root_of(servers: list[Span], ids: set[str] | None = None) -> Span | None:
    """The server span whose caller is not another server span (the entry hop); ``ids``,
    the servers' span ids, when the caller has them already."""
    if ids is None:
        ids = {s.span_id for s in servers}
    roots = [s for s in servers if s.parent_span_id not in ids]
    return min(roots, key=lambda s: (s.start_us, s.service)) if roots else None


_UNSET = object()


def diagnose_spans(client: Span | None, servers: list[Span], catalog: Catalog, *, root: object = _UNSET,
                   ordered: bool = False) -> Diagnosis:
    """The diagnosis of one request from the spans seen of it; ``root`` (``root_of(servers)``)
    and ``ordered`` (servers sorted by start already) spare work the caller has done."""
    version = catalog.version
    failing = [s for s in servers if s.status == "error" or (s.http_status or 0) >= 500]
    if failing:
        hop = _deepest(failing)
        return Diagnosis(
            cls="server_error",
            service=hop.service,
            team=catalog.team_of(hop.service),
            code=hop.error_code,
            evidence=f"{hop.service} answered {hop.http_status or 'error'} {hop.error_code}".strip()
            + f" after {hop.duration_us / 1000:.0f} ms",
            catalog_version=version,
        )
    refused = [s for s in servers if 400 <= (s.http_status or 0) < 500]
    codes = [s.error_code for s in refused] + ([client.error_code] if client and client.http_status and 400 <= client.http_status < 500 else [])
    for code in codes:
        entry = catalog.codes.get(code)
        if entry is not None and entry.cls == "client_misuse":
            hop = _deepest(refused) if refused else None
            return Diagnosis(
                cls="client_misuse",
                service=hop.service if hop else "",
                team=catalog.team_of(hop.service) if hop else "",
                code=code,
                evidence=f"refused with {hop.http_status if hop else client.http_status} {code}",  # type: ignore[union-attr]
                catalog_version=version,
            )
    if refused or (client is not None and client.http_status is not None and 400 <= client.http_status < 500):
        code = codes[0] if codes else ""
        return Diagnosis(cls="unknown", code=code, evidence=f"refused with an uncatalogued code {code!r}",
                         catalog_version=version)
    if client is not None and client.status == "error":
        entry = catalog.codes.get(client.error_code)
        if entry is not None and entry.cls == "client_crash":
            return Diagnosis(cls="client_crash", service=client.service, team=catalog.team_of(client.service),
                             code=client.error_code, evidence=f"app {client.app_version} on {client.platform} crashed",
                             catalog_version=version)
        if not servers:
            return Diagnosis(cls="network_unreachable", code=client.error_code,
                             evidence=f"client error {client.error_code or 'without code'}, no server span",
                             catalog_version=version)
    if root is _UNSET:
        root = root_of(servers)
    if isinstance(root, Span):
        objectives = catalog.services
        callees: dict[str, int] | None = None
        for hop in (servers if ordered else sorted(servers, key=lambda s: s.start_us)):
            objective = objectives[hop.service].objective_ms if hop.service in objectives else 0
            if not objective:
                continue
            if callees is None:
                callees = _callee_time_us(servers)
            own = max(0, hop.duration_us - callees.get(hop.span_id, 0))
            if own > objective * 1000:
                return Diagnosis(cls="server_slow", service=hop.service, team=catalog.team_of(hop.service),
                                 evidence=f"{hop.service} took {own / 1000:.0f} ms itself (objective {objective:.0f} ms)",
                                 catalog_version=version)
        if root.duration_us > catalog.thresholds.server_time_objective_ms * 1000:
            return Diagnosis(cls="server_slow", service=root.service, team=catalog.team_of(root.service),
                             evidence=f"server side took {root.duration_us / 1000:.0f} ms", catalog_version=version)
        if client is not None:
            network_us = client.duration_us - root.duration_us
            limits = catalog.thresholds
            if network_us > limits.network_slow_ms * 1000 and network_us > limits.network_slow_ratio * root.duration_us:
                return Diagnosis(cls="network_slow",
                                 evidence=f"{network_us / 1000:.0f} ms between device and server, "
                                          f"{root.duration_us / 1000:.0f} ms on the server",
                                 catalog_version=version)
    return Diagnosis(cls="ok", catalog_version=version)


def worded(diagnosis: Diagnosis, locale: str, catalog: Catalog, operation: str = "") -> tuple[str, str, str, str]:
    """What a user is told of a diagnosis, in their locale: title, explanation, action, doc URL."""
    text, doc_url = catalog.wording(diagnosis.cls, diagnosis.code, locale)
    fill = {"service": catalog.label_of(diagnosis.service, locale), "operation": operation}
    return text.title.format(**fill), text.explanation.format(**fill), text.action.format(**fill), doc_url


def primary_request_id(report: FaultReport) -> str:
    """The request a report is about: the first it names (the app lists it first); with none
    named, the one request that failed in its client log, if exactly one did."""
    if report.request_ids:
        return report.request_ids[0]
    failed = {s.request_id for s in report.client_log if s.status == "error"}
    return failed.pop() if len(failed) == 1 else ""


def diagnose_report(
    report: FaultReport, request: CorrelatedRequest | None, catalog: Catalog, now_us: int, drill: bool = False
) -> DiagnosedReport:
    """A report's diagnosis and the user-language explanation in the report's locale.

    Uses the correlated request when the server side knew it; else the client span the
    user attached (a request that never reached us leaves only that); else ``unknown``.
    """
    primary = primary_request_id(report)
    if request is not None:
        diagnosis = request.diagnosis
    else:
        attached = [s for s in report.client_log if s.request_id == primary and s.side == "client"]
        if attached:
            diagnosis = diagnose_spans(attached[-1], [], catalog)
        else:
            diagnosis = Diagnosis(cls="unknown", evidence="no request of this report was seen",
                                  catalog_version=catalog.version)
    title, explanation, action, doc_url = worded(diagnosis, report.locale, catalog,
                                                 request.operation if request else "")
    return DiagnosedReport(
        report_id=report.report_id,
        received_at_us=report.received_at_us,
        diagnosed_at_us=now_us,
        user_id=report.user_id,
        account_id=report.account_id,
        client_ip=report.client_ip,
        locale=report.locale,
        app_version=report.app_version,
        platform=report.platform,
        region=report.region,
        network=report.network,
        request_ids=report.request_ids,
        primary_request_id=primary,
        diagnosis=diagnosis,
        title=title,
        explanation=explanation,
        action=action,
        doc_url=doc_url,
        drill=drill,
    )
