"""Shared defaults of every supportlens dashboard: datasources, panel kinds, filters, layout.

Each dashboard module has one builder function per panel, returning the typed values
below; :meth:`Dashboard.to_json` lays the panels out and turns everything into Grafana's
JSON model. Queries stay typed until then — a ClickHouse query carries the columns its
panel reads — so the tests can run every query against ClickHouse and check its shape.

ClickHouse queries are written in the grafana-clickhouse-datasource plugin's SQL: macros
(``$__timeFilter(col)``, ``$__timeInterval(col)``, ``$__interval_s``, ``$__fromTime``,
``$__toTime``, ``$__conditionalAll(cond, $var)``) and template variables
(``${var:singlequote}``). Macro arguments are plain column names: plugin versions before
sqlds' bracket-aware parsing cut an argument at its first closing parenthesis.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Fixed uids: dashboards name their datasources by uid, and the API push and the file
# provisioning of the compose deployment create them under these same uids.
CLICKHOUSE_UID = "supportlens-clickhouse"
PROMETHEUS_UID = "supportlens-prometheus"
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"
FOLDER_UID = "supportlens"
FOLDER_TITLE = "supportlens"
TAG = "supportlens"

GRID_WIDTH = 24  # Grafana's grid is 24 columns wide
SCHEMA_VERSION = 39  # the dashboard JSON model these files follow (Grafana 10.4+)
ALL = "$__all"  # the value Grafana stores when a variable selects All


@dataclass(frozen=True)
class Datasource:
    uid: str
    type: str

    def ref(self) -> dict[str, str]:
        return {"type": self.type, "uid": self.uid}


CLICKHOUSE = Datasource(CLICKHOUSE_UID, CLICKHOUSE_PLUGIN)
PROMETHEUS = Datasource(PROMETHEUS_UID, "prometheus")
# Grafana's own annotation source ("Annotations & Alerts"), on every dashboard.
BUILT_IN = Datasource("-- Grafana --", "grafana")


def _sql(text: str) -> str:
    return textwrap.dedent(text).strip()


@dataclass(frozen=True)
class Sql:
    """A ClickHouse query of a panel, a variable or an annotation, as the plugin receives it."""

    text: str
    columns: tuple[str, ...]  # the columns the panel reads, in this order
    time_series: bool = False  # the plugin pivots long rows on `time` into one series per label

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", _sql(self.text))
        if self.time_series and self.columns[0] != "time":
            raise ValueError("a time series query returns `time` first (the plugin pivots on it)")

    @property
    def datasource(self) -> Datasource:
        return CLICKHOUSE

    def target(self, ref_id: str) -> dict[str, Any]:
        # format: the plugin's sqlutil format option, 0 = time series, 1 = table
        return {"datasource": CLICKHOUSE.ref(), "editorType": "sql", "format": 0 if self.time_series else 1,
                "rawSql": self.text, "refId": ref_id}


@dataclass(frozen=True)
class PromQL:
    """A Prometheus query of a panel; ``legend`` uses Grafana's ``{{label}}`` syntax."""

    expr: str
    legend: str = ""

    @property
    def datasource(self) -> Datasource:
        return PROMETHEUS

    def target(self, ref_id: str) -> dict[str, Any]:
        return {"datasource": PROMETHEUS.ref(), "editorType": "code", "expr": " ".join(self.expr.split()),
                "legendFormat": self.legend or "__auto", "range": True, "refId": ref_id}


Query = Sql | PromQL


@dataclass(frozen=True)
class Panel:
    """One panel: what it shows (kind, queries) and how big it is; placed by the dashboard."""

    kind: str  # Grafana panel type: timeseries | table | stat | row
    title: str
    description: str = ""
    queries: tuple[Query, ...] = ()
    width: int = 12
    height: int = 8
    unit: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    custom: Mapping[str, Any] = field(default_factory=dict)  # fieldConfig.defaults.custom
    defaults: Mapping[str, Any] = field(default_factory=dict)  # more fieldConfig.defaults (min, max, thresholds)
    overrides: tuple[Mapping[str, Any], ...] = ()

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        grid = {"h": self.height, "w": self.width, "x": x, "y": y}
        if self.kind == "row":
            return {"collapsed": False, "gridPos": grid, "id": panel_id, "panels": [], "title": self.title,
                    "type": "row"}
        datasources = {q.datasource for q in self.queries}
        if len(datasources) != 1:
            raise ValueError(f"panel {self.title!r}: its queries must share one datasource")
        defaults: dict[str, Any] = {**self.defaults, "custom": dict(self.custom)}
        if self.unit:
            defaults["unit"] = self.unit
        return {
            "datasource": datasources.pop().ref(),
            "description": self.description,
            "fieldConfig": {"defaults": defaults, "overrides": list(self.overrides)},
            "gridPos": grid,
            "id": panel_id,
            "options": dict(self.options),
            "targets": [q.target(chr(ord("A") + i)) for i, q in enumerate(self.queries)],
            "title": self.title,
            "type": self.kind,
        }


def row(title: str) -> Panel:
    """A full-width section header."""
    return Panel("row", title, width=GRID_WIDTH, height=1)


def timeseries(title: str, description: str, *queries: Query, unit: str = "short", stacked: bool = False,
               bars: bool = False, width: int = 12, height: int = 8,
               defaults: Mapping[str, Any] | None = None) -> Panel:
    custom = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stacked else "none"},
    }
    options = {
        "legend": {"calcs": ["max", "lastNotNull"], "displayMode": "table", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return Panel("timeseries", title, description, queries, width, height, unit, options, custom, defaults or {})


def table(title: str, description: str, query: Query, *, width: int = 12, height: int = 8,
          gauges: Sequence[str] = (), units: Mapping[str, str] | None = None) -> Panel:
    """A table; ``gauges`` names columns drawn as bars within their cells (counts to compare)."""
    overrides = [
        {"matcher": {"id": "byName", "options": name},
         "properties": [{"id": "custom.cellOptions", "value": {"mode": "basic", "type": "gauge"}}]}
        for name in gauges
    ] + [
        {"matcher": {"id": "byName", "options": name}, "properties": [{"id": "unit", "value": unit}]}
        for name, unit in (units or {}).items()
    ]
    return Panel("table", title, description, (query,), width, height,
                 options={"cellHeight": "sm", "showHeader": True},
                 custom={"align": "auto", "filterable": True}, overrides=tuple(overrides))


def stat(title: str, description: str, query: Query, *, unit: str = "short", width: int = 6, height: int = 4,
         warn_at: float | None = None, color: str = "blue") -> Panel:
    """One number; turns red from ``warn_at`` when given."""
    steps: list[dict[str, Any]] = [{"color": color, "value": None}]
    if warn_at is not None:
        steps.append({"color": "red", "value": warn_at})
    return Panel(
        "stat", title, description, (query,), width, height, unit,
        options={"colorMode": "value", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
                 "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "textMode": "auto"},
        defaults={"thresholds": {"mode": "absolute", "steps": steps}},
    )


def in_selection(column: str, variable: str) -> str:
    """``column`` is one of the variable's chosen values; no condition at all when it selects All
    (the plugin's ``$__conditionalAll``: ``1=1`` instead of a list of every value)."""
    return f"$__conditionalAll({column} IN (${{{variable}:singlequote}}), ${variable})"


@dataclass(frozen=True)
class Variable:
    """A multi-value ClickHouse query variable with All, refreshed when the time range changes."""

    name: str
    label: str
    query: Sql

    def to_json(self) -> dict[str, Any]:
        return {
            "current": {"selected": True, "text": ["All"], "value": [ALL]},
            "datasource": CLICKHOUSE.ref(),
            "definition": self.query.text,
            "hide": 0,
            "includeAll": True,
            "label": self.label,
            "multi": True,
            "name": self.name,
            "options": [],
            "query": {"editorType": "sql", "rawSql": self.query.text},
            "refresh": 2,
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
            "type": "query",
        }


def trend_variable(column: str, label: str) -> Variable:
    """Values of a dimension seen in the problem trends of the chosen time range."""
    return Variable(column, label, Sql(
        f"SELECT DISTINCT {column} FROM problem_trends WHERE $__timeFilter(minute) AND {column} != '' "
        f"ORDER BY {column}",
        (column,),
    ))


REGION = trend_variable("region", "Region")
SERVICE = trend_variable("service", "Service")
APP_VERSION = trend_variable("app_version", "App version")


@dataclass(frozen=True)
class Annotation:
    """Events drawn over every time series of a dashboard.

    Its query returns ``time``, ``timeEnd`` (a region when later), ``title``, ``text`` and ``tags``.
    """

    name: str
    query: Sql
    color: str

    def to_json(self) -> dict[str, Any]:
        return {"datasource": CLICKHOUSE.ref(), "enable": True, "hide": False, "iconColor": self.color,
                "name": self.name, "target": self.query.target("Anno")}


# A change in words, "payment 1.4.1 → 1.4.2 deployed in eu-west by ann", then its description and
# link on lines of their own (as `supportlens changes add` prints it).
_CHANGE_VERB = ("transform(kind, ['deploy', 'config', 'feature_flag', 'infra'], "
                "['deployed', 'config changed', 'flag changed', 'infrastructure changed'], kind)")
_CHANGE_VERSIONS = "if(from_version != '' AND version != '', concat(from_version, ' → ', version), version)"
_CHANGE_TEXT = (
    f"concat(arrayStringConcat(arrayFilter(part -> part != '', [service, {_CHANGE_VERSIONS}, {_CHANGE_VERB}]), ' '), "
    "if(region != '', concat(' in ', region), ''), if(author != '', concat(' by ', author), ''), "
    "if(description != '', concat('\\n', description), ''), if(link != '', concat('\\n', link), ''))"
)


def change_annotation() -> Annotation:
    """Every change (deploy, config, feature flag, infrastructure; ``changes``, migration 0011) of
    the range: a mark where it started, a region to where it finished once it said so. Drills
    are left out. On every dashboard that shows time: most outages follow a change."""
    return Annotation("Changes", Sql(f"""
        SELECT started_at AS time, ifNull(finished_at, started_at) AS timeEnd,
               concat(change_id, ' (', kind, ')') AS title,
               {_CHANGE_TEXT} AS text,
               arrayStringConcat(arrayFilter(tag -> tag != '', [kind, service, region, version]), ',') AS tags
        FROM changes FINAL
        WHERE started_at <= $__toTime AND ifNull(finished_at, started_at) >= $__fromTime AND NOT drill
        ORDER BY time, change_id
    """, ("time", "timeEnd", "title", "text", "tags")), color="purple")


BUILT_IN_ANNOTATION: dict[str, Any] = {
    "builtIn": 1, "datasource": BUILT_IN.ref(), "enable": True, "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
}


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    annotations: tuple[Annotation, ...] = ()
    time_from: str = "now-6h"

    def sql(self) -> Iterator[tuple[str, Sql]]:
        """Every ClickHouse query of the dashboard, named by where it is used."""
        for variable in self.variables:
            yield f"variable {variable.name}", variable.query
        for annotation in self.annotations:
            yield f"annotation {annotation.name}", annotation.query
        for panel in self.panels:
            for query in panel.queries:
                if isinstance(query, Sql):
                    yield f"panel {panel.title}", query

    def to_json(self) -> dict[str, Any]:
        return {
            "annotations": {"list": [BUILT_IN_ANNOTATION, *(a.to_json() for a in self.annotations)]},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,  # a shared crosshair: the same moment in every panel
            "links": [{"asDropdown": False, "icon": "external link", "includeVars": False, "keepTime": True,
                       "tags": [TAG], "targetBlank": False, "title": "supportlens", "type": "dashboards"}],
            "liveNow": False,
            "panels": _layout(self.panels),
            "refresh": "1m",
            "schemaVersion": SCHEMA_VERSION,
            "tags": [TAG],
            "templating": {"list": [v.to_json() for v in self.variables]},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "utc",
            "title": self.title,
            "uid": self.uid,
        }


def _layout(panels: Sequence[Panel]) -> list[dict[str, Any]]:
    """Left to right, wrapping at the grid's width; a row header starts a new line. Ids count from 1."""
    placed, x, y, line_height = [], 0, 0, 0
    for panel_id, panel in enumerate(panels, 1):
        if panel.width > GRID_WIDTH:
            raise ValueError(f"panel {panel.title!r} is wider than the grid")
        if panel.kind == "row" or x + panel.width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        placed.append(panel.to_json(panel_id, x, y))
        x, line_height = x + panel.width, max(line_height, panel.height)
        if panel.kind == "row":
            x, y, line_height = 0, y + line_height, 0
    return placed
