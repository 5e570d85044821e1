"""Lookup results as rich tables for people (``--json`` prints the structs instead)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from supportlens.contracts import Account, IncidentEvent
from supportlens.fit import Fitted, fit
from supportlens.store.paths import CommonPaths, summary
from supportlens.store import TableCounts
from supportlens.store.lookup import ReportDetail, RequestChain, Timeline, TimelineEntry, TopProblems
from supportlens.store.misuse import MisuseHit

CLASS_STYLES = {
    "ok": "green", "network_unreachable": "magenta", "network_slow": "magenta", "server_error": "red",
    "server_slow": "yellow", "client_misuse": "cyan", "client_crash": "red", "unknown": "dim", "pending": "dim",
}
WATERFALL_WIDTH = 40
MISUSE_SHOWN = 5  # detections under a timeline; --json has every one


def when(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def millis(us: int) -> str:
    return f"{us / 1000:,.1f} ms"


def _cls(name: str) -> Text:
    return Text(name, style=CLASS_STYLES.get(name, ""))


def _diagnosis(entry: TimelineEntry) -> Text:
    """The entry's class; a report traced to an earlier misuse also says what it looked like."""
    text = _cls(entry.diagnosis_class)
    if entry.surfaced_as:
        text.append(f" (surfaced as {entry.surfaced_as})", style="dim")
    return text


def misuse_line(hit: MisuseHit) -> str:
    """One detection in a line: what, when, which request, whose, and the reports it explains."""
    who = " · ".join(f"{k} {v}" for k, v in (("user", hit.user_id), ("account", hit.account_id)) if v)
    traced = f", explains {hit.reports} fault report{'s' if hit.reports != 1 else ''}" if hit.reports else ""
    return (f"{hit.code} ({hit.rule}) at {when(hit.at_us)}, request {hit.request_id or '—'}"
            + (f", {who}" if who else "") + (" (drill)" if hit.drill else "") + traced)


def traced_line(report: ReportDetail) -> str:
    """Where a traced report's failure came from: the earlier misuse and what it surfaced as."""
    hit = report.misuse
    if hit is None:  # the report's new diagnosis landed before the detection did
        return (f"earlier misuse: {report.diagnosis_code} (detection {report.misuse_detection_id}, not stored yet)"
                f" — it surfaced as {report.surfaced_as}")
    return (f"earlier misuse: {hit.code} ({hit.rule}) at {when(hit.at_us)}, request {hit.request_id or '—'}"
            f" — it surfaced as {report.surfaced_as}")


def timeline_table(result: Timeline) -> Fitted:
    title = (f"{result.key_kind} {result.key}: {result.requests:,} requests ({result.failed:,} failed), "
             f"{result.reports:,} fault reports, {when(result.since_us)} → {when(result.until_us)}")
    table = Table("time (UTC)", "kind", "id", "what", "diagnosis", "service", "status", "duration", "detail",
                  title=title, title_justify="left")
    for e in result.entries:
        table.add_row(
            when(e.at_us), e.kind + (" (drill)" if e.drill else ""), e.id, e.what[:60], _diagnosis(e),
            e.service, e.status, millis(e.duration_us) if e.kind == "request" else "", e.detail[:80],
        )
    captions = []
    if not result.entries and not result.misuse:
        captions.append("nothing in this window: try a longer --since, or another key")
    if result.incidents:
        captions.append("fell into: " + "; ".join(
            f"{i.incident_id} {i.severity} {i.title or i.root_key} ({i.state}, {i.requests} failed requests)"
            for i in result.incidents))
    captions += [escape(f"misuse found: {misuse_line(hit)}") for hit in result.misuse[:MISUSE_SHOWN]]
    if len(result.misuse) > MISUSE_SHOWN:
        captions.append(f"… and {len(result.misuse) - MISUSE_SHOWN} more misuse detections (--json lists them)")
    table.caption = "\n".join(captions) or None
    table.caption_justify = "left"  # lines of their own, read like the title
    return fit(table, ids={"id"}, optional=("status", "duration", "service"))


def chain_view(chain: RequestChain) -> Group | Text:
    if not chain.found:
        extra = f"; named by fault report(s) {', '.join(chain.reports)}" if chain.reports else ""
        return Text(f"request {chain.request_id}: not found{extra}")
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")  # a long URL folds, never cut
    for label, value in (
        ("start", when(chain.start_us)), ("operation", chain.operation),
        ("customer", f"ip {chain.client_ip or '—'} · user {chain.user_id or '—'} · account {chain.account_id or '—'}"),
        ("client", " · ".join(v for v in (chain.app_version, chain.platform, chain.region, chain.network) if v)),
        ("diagnosis", f"{chain.diagnosis_class or 'not correlated yet'} {chain.diagnosis_service} "
                      f"{('(' + chain.diagnosis_team + ')') if chain.diagnosis_team else ''} {chain.diagnosis_code}"),
        ("evidence", chain.evidence), ("seen", f"{chain.completeness} (version {chain.version})"),
        ("fault reports", ", ".join(chain.reports) or "none"),
    ):
        summary.add_row(label, value)
    total = max([s.offset_us + s.duration_us for s in chain.spans] + [1])
    spans = Table("side", "service", "operation", "start", "duration", "status", "waterfall",
                  title=f"call chain of {chain.request_id}", title_justify="left")
    for s in chain.spans:
        lead = round(s.offset_us / total * WATERFALL_WIDTH)
        width = max(1, round(s.duration_us / total * WATERFALL_WIDTH))
        bar = Text(" " * lead + "█" * width, style="red" if s.status == "error" else "green")
        status = s.status + (f" {s.http_status}" if s.http_status else "") + (f" {s.error_code}" if s.error_code else "")
        spans.add_row(s.side, s.service, s.operation, f"+{millis(s.offset_us)}", millis(s.duration_us), status, bar)
    return Group(Panel(summary, title=f"request {chain.request_id}", title_align="left"),
                 fit(spans, ids={"waterfall"}, optional=("waterfall", "operation")))  # a bar prints whole


def report_view(report: ReportDetail) -> Panel | Text:
    if not report.found:
        return Text(f"fault report {report.report_id}: not found")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")  # a long URL folds, never cut
    rows = [
        ("received", when(report.received_at_us)),
        ("customer", f"ip {report.client_ip} · user {report.user_id or '—'} · account {report.account_id or '—'}"),
        ("client", " · ".join(v for v in (report.app_version, report.platform, report.region, report.locale) if v)),
        ("user said", report.user_message or "—"), ("error code", report.error_code or "—"),
        ("requests", ", ".join(report.request_ids) or "—"),
        ("diagnosis", f"{report.diagnosis_class} {report.diagnosis_service} "
                      f"{('(' + report.diagnosis_team + ')') if report.diagnosis_team else ''}"
         if report.diagnosed else "pending"),
    ]
    if report.misuse_detection_id:
        rows.append(("traced to", escape(traced_line(report))))
        if report.misuse is not None and report.misuse.evidence:
            rows.append(("", escape(report.misuse.evidence)))
    if report.diagnosed:
        rows += [("told the user", report.title), ("", report.explanation), ("suggested", report.action),
                 ("doc", report.doc_url or "—")]
    rows.append(("before it", summary(report.path) if report.path
                 else "no consented behaviour in the 10 minutes before"))
    for label, value in rows:
        grid.add_row(label, value)
    return Panel(grid, title=f"fault report {report.report_id}", title_align="left")


def top_table(result: TopProblems) -> Fitted:
    table = Table("diagnosis", result.by, "requests", "share of all requests", "users",
                  title=f"top problems by {result.by}, {when(result.since_us)} → {when(result.until_us)}",
                  title_justify="left")
    for row in result.rows:
        table.add_row(_cls(row.diagnosis_class), row.value or "—", f"{row.requests:,}", f"{row.share:.1%}",
                      f"{row.users:,}")
    if not result.rows:
        table.caption = "no problems in this window"
    return fit(table)


def counts_table(counts: TableCounts, where: str) -> Fitted:
    table = Table("table", "rows", "stored (copies not yet merged)", title=f"ClickHouse {where}", title_justify="left")
    for name, count in counts.rows.items():
        table.add_row(name, f"{count:,}", f"{counts.stored[name]:,}")
    return fit(table, ids={"table"})



def incidents_table(shown: Sequence[IncidentEvent]) -> Fitted:
    """Each incident's latest transition (``supportlens incidents``)."""
    table = Table("incident", "state", "severity", "started (UTC)", "what", "users", "teams", "latest reason",
                  "suspect change", title=f"incidents: {sum(e.transition != 'resolved' for e in shown)} open")
    for event in shown:
        started = datetime.fromtimestamp(event.started_at_us / 1e6, tz=timezone.utc).strftime("%m-%d %H:%M:%S")
        table.add_row(event.incident_id, event.transition + (" (drill)" if event.drill else ""), event.severity,
                      started, f"{event.title}\n{event.root_key}", f"{event.affected_users:,}", ", ".join(event.teams),
                      event.reason, _suspects(event))
    return fit(table, ids={"incident"}, optional=("teams", "users", "suspect change"))


def _suspects(event: IncidentEvent) -> str:
    """The likeliest change in full, with its id for ``supportlens changes``; how many more."""
    if not event.suspects:
        return ""
    top = event.suspects[0]
    more = len(event.suspects) - 1
    return escape(f"{top.reason} [{top.change_id}]" + (f" (+{more} more)" if more else ""))


def accounts_table(accounts: Sequence[Account]) -> Fitted:
    """The accounts and where their notices go (``supportlens accounts list``)."""
    table = Table("account", "name", "tier", "locale", "channel", "sends to", title=f"{len(accounts):,} accounts")
    for a in accounts:
        to = a.webhook_url if a.channel == "webhook" else ", ".join(c.email for c in a.contacts)
        table.add_row(a.account_id, a.name, a.tier, a.locale, a.channel, to)
    return fit(table, ids={"account"}, optional=("locale", "channel"))


def paths_table(found: CommonPaths) -> Fitted:
    """The most common paths into a fault report, per diagnosis class (``supportlens paths``)."""
    table = Table("diagnosis", "the last steps before the report", "reports", "share of the class",
                  title=f"paths into fault reports, {when(found.since_us)} → {when(found.until_us)}",
                  title_justify="left")
    for row in found.paths:
        table.add_row(_cls(row.diagnosis_class), " → ".join(row.path), f"{row.reports:,}", f"{row.share:.0%}")
    gone = ", ".join(f"{cls} {n:,}" for cls, n in found.without_path.items())
    table.caption = ("reports without consented behaviour before them: " + gone) if gone else None
    if not found.paths:
        table.caption = "no report with consented behaviour before it in this window"
    return fit(table, optional=("share of the class",))
