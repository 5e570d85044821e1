"""Reach the support lookups: directly on ClickHouse, or through a running support API.

The embedded store can be opened by one process only; while ``supportlens serve`` holds
it, the CLI asks that process's API instead. Both paths return the same structs.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Protocol, TypeVar

import msgspec
import requests
from clickhouse_connect.driver.client import Client

from supportlens import store
from supportlens.config import Settings
from supportlens.errors import UserError
from supportlens.store import account_report, changes, daily, funnels, lookup, paths, perception, recorded
from supportlens.store.account_report import AccountFigures
from supportlens.store.changes import RecentChanges
from supportlens.store.funnels import FunnelReport
from supportlens.store.paths import CommonPaths
from supportlens.store.daily import DailyFigures
from supportlens.store.perception import PerceptionFigures
from supportlens.store.lookup import ReportDetail, RequestChain, Timeline, TopProblems
from supportlens.store.recorded import RecordedIncident, ReportPage, SpanPage

T = TypeVar("T")


class Support(Protocol):
    def timeline(self, kind: str, key: str, since_us: int, until_us: int, limit: int) -> Timeline: ...
    def request_chain(self, request_id: str) -> RequestChain: ...
    def report_detail(self, report_id: str) -> ReportDetail: ...
    def top_problems(self, by: str, since_us: int, until_us: int, limit: int) -> TopProblems: ...
    def table_counts(self) -> store.TableCounts: ...
    def recorded_incident(self, incident_id: str) -> RecordedIncident: ...
    def recorded_spans(self, since_us: int, until_us: int, after: str, limit: int) -> SpanPage: ...
    def recorded_reports(self, since_us: int, until_us: int, after: str, limit: int) -> ReportPage: ...
    def daily_figures(self, day: str) -> DailyFigures: ...
    def perception_figures(self, period: str, day: str) -> PerceptionFigures: ...
    def account_figures(self, account_id: str, period: str, day: str) -> AccountFigures: ...
    def recent_changes(self, since_us: int, until_us: int, service: str, limit: int) -> RecentChanges: ...
    def common_paths(self, since_us: int, until_us: int, steps: int) -> CommonPaths: ...
    def funnel_report(self, funnels_toml: str, funnel: str, since_us: int, until_us: int, by: str) -> FunnelReport: ...


class DirectSupport:
    """The lookups on a ClickHouse client of this process."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def timeline(self, kind: str, key: str, since_us: int, until_us: int, limit: int) -> Timeline:
        return lookup.timeline(self.client, kind, key, since_us, until_us, limit)

    def request_chain(self, request_id: str) -> RequestChain:
        return lookup.request_chain(self.client, request_id)

    def report_detail(self, report_id: str) -> ReportDetail:
        return lookup.report_detail(self.client, report_id)

    def top_problems(self, by: str, since_us: int, until_us: int, limit: int) -> TopProblems:
        return lookup.top_problems(self.client, by, since_us, until_us, limit)

    def table_counts(self) -> store.TableCounts:
        return store.table_counts(self.client)

    def recorded_incident(self, incident_id: str) -> RecordedIncident:
        return recorded.recorded_incident(self.client, incident_id)

    def recorded_spans(self, since_us: int, until_us: int, after: str, limit: int) -> SpanPage:
        return recorded.recorded_spans(self.client, since_us, until_us, after, limit)

    def recorded_reports(self, since_us: int, until_us: int, after: str, limit: int) -> ReportPage:
        return recorded.recorded_reports(self.client, since_us, until_us, after, limit)

    def daily_figures(self, day: str) -> DailyFigures:
        return daily.daily_figures(self.client, _day(day))

    def perception_figures(self, period: str, day: str) -> PerceptionFigures:
        return perception.perception_figures(self.client, period, _day(day))

    def account_figures(self, account_id: str, period: str, day: str) -> AccountFigures:
        return account_report.account_figures(self.client, account_id, period, _day(day))

    def recent_changes(self, since_us: int, until_us: int, service: str, limit: int) -> RecentChanges:
        return changes.recent_changes(self.client, since_us, until_us, service, limit)

    def common_paths(self, since_us: int, until_us: int, steps: int) -> CommonPaths:
        return paths.common_paths(self.client, since_us, until_us, steps)

    def funnel_report(self, funnels_toml: str, funnel: str, since_us: int, until_us: int, by: str) -> FunnelReport:
        chosen = funnels.pick(funnels.parse_funnels(funnels_toml), funnel)
        return funnels.funnel_report(self.client, chosen, since_us, until_us, funnels.parse_by(by))


class RemoteSupport:
    """The lookups through the support API of ``supportlens serve``."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()

    def healthy(self) -> bool:
        try:
            return self.http.get(f"{self.base_url}/healthz", timeout=1.0).ok
        except requests.RequestException:
            return False

    def _get(self, path: str, params: dict[str, Any], result: type[T]) -> T:
        try:
            response = self.http.get(f"{self.base_url}{path}", params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise UserError(f"the support API at {self.base_url} did not answer ({type(exc).__name__})",
                            hint="is `supportlens serve` running?") from None
        if response.status_code == 400:
            body = response.json()
            raise lookup.LookupInputError(body.get("error", "bad request"), hint=body.get("hint", ""))
        if not response.ok:
            raise UserError(f"the support API answered {response.status_code}: {response.text[:200]}")
        return msgspec.json.decode(response.content, type=result)

    def timeline(self, kind: str, key: str, since_us: int, until_us: int, limit: int) -> Timeline:
        return self._get("/v1/timeline", {kind: key, "since_us": since_us, "until_us": until_us, "limit": limit},
                         Timeline)

    def request_chain(self, request_id: str) -> RequestChain:
        return self._get("/v1/request", {"id": request_id}, RequestChain)

    def report_detail(self, report_id: str) -> ReportDetail:
        return self._get("/v1/report", {"id": report_id}, ReportDetail)

    def top_problems(self, by: str, since_us: int, until_us: int, limit: int) -> TopProblems:
        return self._get("/v1/top", {"by": by, "since_us": since_us, "until_us": until_us, "limit": limit},
                         TopProblems)

    def table_counts(self) -> store.TableCounts:
        return self._get("/v1/tables", {}, store.TableCounts)

    def recorded_incident(self, incident_id: str) -> RecordedIncident:
        return self._get("/v1/incident", {"id": incident_id}, RecordedIncident)

    def recorded_spans(self, since_us: int, until_us: int, after: str, limit: int) -> SpanPage:
        return self._get("/v1/recorded/spans", {"since_us": since_us, "until_us": until_us, "after": after,
                                                "limit": limit}, SpanPage)

    def recorded_reports(self, since_us: int, until_us: int, after: str, limit: int) -> ReportPage:
        return self._get("/v1/recorded/reports", {"since_us": since_us, "until_us": until_us, "after": after,
                                                  "limit": limit}, ReportPage)

    def daily_figures(self, day: str) -> DailyFigures:
        return self._get("/v1/reports/daily", {"day": day}, DailyFigures)

    def perception_figures(self, period: str, day: str) -> PerceptionFigures:
        return self._get("/v1/reports/perception", {"period": period, "day": day}, PerceptionFigures)

    def account_figures(self, account_id: str, period: str, day: str) -> AccountFigures:
        return self._get("/v1/reports/account", {"account": account_id, "period": period, "day": day}, AccountFigures)

    def recent_changes(self, since_us: int, until_us: int, service: str, limit: int) -> RecentChanges:
        return self._get("/v1/changes", {"since_us": since_us, "until_us": until_us, "service": service,
                                         "limit": limit}, RecentChanges)

    def common_paths(self, since_us: int, until_us: int, steps: int) -> CommonPaths:
        return self._get("/v1/paths", {"since_us": since_us, "until_us": until_us, "steps": steps}, CommonPaths)

    def funnel_report(self, funnels_toml: str, funnel: str, since_us: int, until_us: int, by: str) -> FunnelReport:
        from supportlens.store.funnels import FUNNELS_PATH

        packaged = funnels_toml == FUNNELS_PATH.read_text(encoding="utf-8")
        return self._get("/v1/funnels", {"funnels": "" if packaged else funnels_toml, "funnel": funnel,
                                         "since_us": since_us, "until_us": until_us, "by": by}, FunnelReport)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise lookup.LookupInputError(f"{text[:40]!r} is not a day", hint="give YYYY-MM-DD") from None


def open_support(settings: Settings) -> Support:
    """The way to the lookups from a command line.

    A server DSN is queried directly, read-only. The embedded store is asked through the
    support API when one answers (``supportlens serve`` holds the store), and opened here otherwise.
    """
    if not settings.embedded_store:
        # a server's schema is the sink's to migrate; support staff may hold read-only credentials
        return DirectSupport(store.connect(settings, create_database=False))
    remote = RemoteSupport(settings.support_url)
    if remote.healthy():
        return remote
    client = store.connect(settings)
    store.migrate(client, settings)  # the store is ours alone right now: an empty one gets its tables
    return DirectSupport(client)
