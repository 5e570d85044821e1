"""Dashboards as code: the committed JSON is what the code builds, each dashboard is a sound
Grafana model (unique ids, a grid without overlaps, datasources that provisioning creates,
variables that exist and are used), Prometheus panels name metrics supportlens declares and
parse as PromQL; and the plugin's macro expansion that the ClickHouse tests rely on
(``grafana_sql``) matches the plugin's documented examples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from dashboards.build import JSON_DIR, all_dashboards, expected_files, render, write
from dashboards.common import GRID_WIDTH, PromQL, Sql
from grafana_sql import Selection, TimeRange, expand
from supportlens.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PROVISIONED = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/supportlens.yaml").read_text())
DASHBOARDS = {d.uid: d for d in all_dashboards()}
MODELS = {uid: d.to_json() for uid, d in DASHBOARDS.items()}
VARIABLE_USE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def test_the_committed_json_is_what_the_code_builds():
    committed = {p.name: p.read_text(encoding="utf-8") for p in JSON_DIR.glob("*.json")}
    assert committed == expected_files(), "run `supportlens dashboards build` and commit dashboards/json"


def test_building_is_deterministic_and_write_removes_stale_files(tmp_path):
    (tmp_path / "old-dashboard.json").write_text("{}")
    assert len(write(tmp_path)) == len(DASHBOARDS) + 1
    assert write(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected_files())
    assert all(render(d) == render(d) for d in all_dashboards())


def _panels(uid: str) -> list[dict[str, Any]]:
    return MODELS[uid]["panels"]


@pytest.mark.parametrize("uid", sorted(MODELS))
def test_panels_have_unique_ids_and_titles_and_tile_the_grid(uid):
    panels = _panels(uid)
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize("uid", sorted(MODELS))
def test_every_datasource_is_one_provisioning_creates(uid):
    provisioned = {(d["uid"], d["type"]) for d in PROVISIONED["datasources"]}
    model = MODELS[uid]
    refs = [p["datasource"] for p in model["panels"] if p["type"] != "row"]
    refs += [t["datasource"] for p in model["panels"] for t in p.get("targets", [])]
    refs += [v["datasource"] for v in model["templating"]["list"]]
    refs += [a["datasource"] for a in model["annotations"]["list"] if not a.get("builtIn")]
    assert refs and {(r["uid"], r["type"]) for r in refs} <= provisioned
    for panel in model["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def _query_texts(uid: str) -> list[str]:
    model = MODELS[uid]
    texts = [t.get("rawSql") or t.get("expr") for p in model["panels"] for t in p.get("targets", [])]
    texts += [v["query"]["rawSql"] for v in model["templating"]["list"]]
    texts += [a["target"]["rawSql"] for a in model["annotations"]["list"] if "target" in a]
    return texts


@pytest.mark.parametrize("uid", sorted(MODELS))
def test_every_variable_used_exists_and_every_variable_is_used(uid):
    declared = {v["name"] for v in MODELS[uid]["templating"]["list"]}
    used = {a or b for text in _query_texts(uid) for a, b in VARIABLE_USE.findall(text)}
    used = {name for name in used if not name.startswith("__")}  # $__macros and Grafana's own $__rate_interval
    assert used == declared


@pytest.mark.parametrize("uid", sorted(MODELS))
def test_typed_queries_and_json_agree(uid):
    dashboard = DASHBOARDS[uid]
    for panel, model in zip(dashboard.panels, MODELS[uid]["panels"], strict=True):
        for query, target in zip(panel.queries, model.get("targets", []), strict=True):
            if isinstance(query, Sql):
                assert target["rawSql"] == query.text and target["format"] == (0 if query.time_series else 1)
            else:
                assert target["expr"] == " ".join(query.expr.split())


def _declared_series() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {"up"}
    for metric in registry.collect():
        names |= {f"{metric.name}_total"} if metric.type == "counter" else \
            {f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count"} if metric.type == "histogram" \
            else {metric.name}
    return names


def _promql() -> list[PromQL]:
    return [q for d in all_dashboards() for p in d.panels for q in p.queries if isinstance(q, PromQL)]


def test_prometheus_panels_name_metrics_supportlens_declares():
    series = {name for q in _promql() for name in re.findall(r"\b(supportlens_\w+|up)\b(?=\s*[{\[)])", q.expr)}
    assert series and series <= _declared_series()
    for wanted in ("supportlens_events_in_total", "supportlens_consumer_lag_records", "supportlens_dead_letters_total",
                   "supportlens_sink_write_seconds_bucket", "supportlens_incidents_open"):
        assert wanted in series


@pytest.mark.promtool
def test_prometheus_panel_queries_parse(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run deploy/local/services.sh (make test does)")
    # each query as a recording rule; $__rate_interval is Grafana's (at least four scrapes): give it one
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.expr.replace("$__rate_interval", "1m")}
        for i, q in enumerate(_promql())]}]}
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_time_series_queries_return_time_first():
    with pytest.raises(ValueError, match="returns `time` first"):
        Sql("SELECT 1 AS value", ("value",), time_series=True)
    for dashboard in all_dashboards():
        for _, sql in dashboard.sql():
            assert not sql.time_series or re.search(r"\bAS time\b", sql.text)


def test_the_json_names_no_secret():
    text = json.dumps(MODELS)
    assert "password" not in text.lower() and "token" not in text.lower()


# ---- the plugin's expansion, against its README's examples --------------------------------------
# README "Macros": from 1415792726 (…123 ms) to 1447328726 (…456 ms), interval 20 s
README_RANGE = TimeRange(1415792726123, 1447328726456, 20_000)


@pytest.mark.parametrize(("sql", "expanded"), [
    ("$__timeFilter(time)", "time >= toDateTime(1415792726) AND time <= toDateTime(1447328726)"),
    ("$__timeFilter_ms(time)",
     "time >= fromUnixTimestamp64Milli(1415792726123) AND time <= fromUnixTimestamp64Milli(1447328726456)"),
    ("$__dateFilter(date)", "date >= toDate('2014-11-12') AND date <= toDate('2015-11-12')"),
    ("$__fromTime", "toDateTime(1415792726)"),
    ("$__toTime", "toDateTime(1447328726)"),
    ("$__fromTime_ms", "fromUnixTimestamp64Milli(1415792726123)"),
    ("$__toTime_ms", "fromUnixTimestamp64Milli(1447328726456)"),
    ("$__interval_s", "20"),
    ("$__timeInterval(column)", "toStartOfInterval(toDateTime(column), INTERVAL 20 second)"),
    ("$__timeInterval_ms(column)", "toStartOfInterval(toDateTime64(column, 3), INTERVAL 20000 millisecond)"),
])
def test_macros_expand_as_the_plugin_documents(sql, expanded):
    assert expand(sql, README_RANGE) == expanded


def test_macros_inside_a_query_and_a_sub_second_interval():
    sql = ("SELECT $__timeInterval(at) AS time, count() * 60 / $__interval_s FROM t "
           "WHERE $__timeFilter( at ) GROUP BY time")
    assert expand(sql, TimeRange(1_000_000, 2_000_999, 500)) == (
        "SELECT toStartOfInterval(toDateTime(at), INTERVAL 1 second) AS time, count() * 60 / 1 FROM t "
        "WHERE at >= toDateTime(1000) AND at <= toDateTime(2000) GROUP BY time")


def test_conditional_all_drops_the_condition_when_all_is_selected():
    sql = "WHERE $__conditionalAll(region IN (${region:singlequote}), $region) AND x"
    assert expand(sql, README_RANGE, {"region": Selection(("a", "b"), all=True)}) == "WHERE 1=1 AND x"
    assert expand(sql, README_RANGE, {"region": Selection(("cn-east", "o'brien"))}) == \
        "WHERE region IN ('cn-east','o\\'brien') AND x"


def test_conditional_all_with_nested_brackets_and_several_variables():
    sql = ("$__conditionalAll(hasAny(services, [${service:singlequote}]), $service) AND "
           "$__conditionalAll(app_version IN (${app_version:singlequote}), ${app_version})")
    variables = {"service": Selection(("payment",)), "app_version": Selection((), all=True)}
    assert expand(sql, README_RANGE, variables) == "hasAny(services, ['payment']) AND 1=1"


def test_a_bare_multi_value_variable_is_a_quoted_list():
    assert expand("x IN ($region)", README_RANGE, {"region": Selection(("a", "b"))}) == "x IN ('a','b')"


@pytest.mark.parametrize(("sql", "problem"), [
    ("$__timeFitler(at)", "not a macro"),
    ("$__timeFilter(toDateTime(at))", "give a column name"),
    ("$__timeFilter(a, b)", "expected 1 argument"),
    ("$__timeInterval(at", "unbalanced"),
])
def test_mistakes_in_macros_fail_instead_of_reaching_clickhouse(sql, problem):
    with pytest.raises(ValueError, match=problem):
        expand(sql, README_RANGE)
