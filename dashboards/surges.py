"""Fault reports & surges: how many reports arrive against what is usual, and what the surge
detector made of the failure counts, with incidents drawn over every graph.

Reports come from ``fault_reports`` and ``report_diagnoses``; surges from ``surges`` (every
start / update / end event with its score, rate and the detector's baseline, migration 0008).
The reports' baseline is the same time of day over the seven days before — the daily
seasonality a person compares with by eye; the detector's own baseline per dimension value
is in the surge events.
"""

from __future__ import annotations

from dashboards.common import (
    APP_VERSION, REGION, SERVICE, Dashboard, Panel, Sql, change_annotation, in_selection, row, table, timeseries,
)
from dashboards.incidents import incident_annotation

UID = "supportlens-surges"
# Fault reports carry no service (a report names requests; the diagnosis names the service).
REPORT_FILTERS = " AND ".join(in_selection(column, column) for column in ("region", "app_version"))
SURGE_LABEL = "concat(dimension, '=', value)"


def reports_vs_baseline() -> Panel:
    # Each report also counts, shifted by 1…7 days, towards the baseline of the days after it.
    return timeseries(
        "Fault reports vs their 7-day baseline",
        "Reports per minute, and the mean at the same time of day over the previous 7 days "
        "(region and app version filters apply; reports carry no service).",
        Sql(f"""
            SELECT $__timeInterval(shifted) AS time,
                   countIf(days_ago = 0) * 60 / $__interval_s AS reports_per_min,
                   countIf(days_ago > 0) / 7 * 60 / $__interval_s AS baseline_per_min
            FROM
            (
                SELECT received_at + toIntervalDay(days_ago) AS shifted, days_ago
                FROM fault_reports FINAL
                ARRAY JOIN range(8) AS days_ago
                WHERE received_at >= $__fromTime - INTERVAL 7 DAY AND received_at <= $__toTime
                  AND {REPORT_FILTERS}
            )
            WHERE $__timeFilter(shifted)
            GROUP BY time
            ORDER BY time
        """, ("time", "reports_per_min", "baseline_per_min"), time_series=True),
        width=24,
    )


def reports_by_class() -> Panel:
    return timeseries("Fault reports by diagnosis", "Reports per interval by the class their diagnosis found.", Sql(f"""
        SELECT $__timeInterval(received_at) AS time, diagnosis_class, count() AS reports
        FROM report_diagnoses FINAL
        WHERE $__timeFilter(received_at) AND NOT drill AND {REPORT_FILTERS}
          AND {in_selection("diagnosis_service", "service")}
        GROUP BY time, diagnosis_class
        ORDER BY time, diagnosis_class
    """, ("time", "diagnosis_class", "reports"), time_series=True), bars=True, stacked=True, width=12)


def surge_scores() -> Panel:
    return timeseries(
        "Surge scores",
        "Score in [0, 1] of each surging dimension value; a surge starts at 0.75 and ends below 0.5.",
        Sql(f"""
            SELECT $__timeInterval(at) AS time, {SURGE_LABEL} AS surge, max(score) AS score
            FROM surges FINAL
            WHERE $__timeFilter(at) AND NOT drill AND kind = 'surge'
            GROUP BY time, surge
            ORDER BY time, surge
        """, ("time", "surge", "score"), time_series=True),
        unit="none", width=12,
        defaults={"max": 1, "min": 0, "thresholds": {"mode": "absolute", "steps": [
            {"color": "green", "value": None}, {"color": "red", "value": 0.75}]}},
    )


def surge_rates() -> Panel:
    return timeseries(
        "Surging rates vs the detector's baseline",
        "Failures and reports per minute of each surging dimension value, and the baseline the detector expected.",
        Sql(f"""
            SELECT $__timeInterval(at) AS time, {SURGE_LABEL} AS surge,
                   max(rate_per_min) AS rate_per_min, max(baseline_per_min) AS baseline_per_min
            FROM surges FINAL
            WHERE $__timeFilter(at) AND NOT drill AND kind = 'surge'
            GROUP BY time, surge
            ORDER BY time, surge
        """, ("time", "surge", "rate_per_min", "baseline_per_min"), time_series=True),
        width=12,
    )


def surges_started() -> Panel:
    return timeseries("Surges started by dimension", "New surges per interval.", Sql("""
        SELECT $__timeInterval(at) AS time, dimension, count() AS surges
        FROM surges FINAL
        WHERE $__timeFilter(at) AND phase = 'start' AND NOT drill AND kind = 'surge'
        GROUP BY time, dimension
        ORDER BY time, dimension
    """, ("time", "dimension", "surges"), time_series=True), bars=True, stacked=True, width=12)


def surge_list() -> Panel:
    return table("Surges", "Every surge of the range, latest first: its peak score and what it counted.", Sql("""
        SELECT surge_id, dimension, value, min(started_at) AS started_at, max(at) AS last_event,
               argMax(phase, at) AS phase, max(score) AS peak_score, max(reports) AS reports,
               max(failed_requests) AS failed_requests, max(affected_users) AS affected_users
        FROM surges FINAL
        WHERE $__timeFilter(at) AND NOT drill AND kind = 'surge'
        GROUP BY surge_id, dimension, value
        ORDER BY started_at DESC
        LIMIT 200
    """, ("surge_id", "dimension", "value", "started_at", "last_event", "phase", "peak_score", "reports",
          "failed_requests", "affected_users")), width=24, height=8, gauges=("affected_users",))


def canary_list() -> Panel:
    return table(
        "Canary findings",
        "Rolling-out versions that failed significantly more often than the version they replace "
        "(streams/canary.py): both failure shares at the worst evaluation, and when it stopped.",
        Sql("""
            SELECT surge_id, attributes['target'] AS target, attributes['version'] AS version,
                   attributes['baseline_version'] AS baseline_version,
                   attributes['diagnosis_class'] AS diagnosis_class, min(started_at) AS started_at,
                   max(at) AS last_event, argMax(phase, at) AS phase,
                   max(toFloat64OrZero(attributes['failure_share'])) AS failure_share,
                   max(toFloat64OrZero(attributes['baseline_failure_share'])) AS baseline_failure_share
            FROM surges FINAL
            WHERE $__timeFilter(at) AND NOT drill AND kind = 'canary'
            GROUP BY surge_id, target, version, baseline_version, diagnosis_class
            ORDER BY started_at DESC
            LIMIT 200
        """, ("surge_id", "target", "version", "baseline_version", "diagnosis_class", "started_at", "last_event",
              "phase", "failure_share", "baseline_failure_share")),
        width=24, height=6, units={"failure_share": "percentunit", "baseline_failure_share": "percentunit"})


def dashboard() -> Dashboard:
    return Dashboard(
        UID, "supportlens · Fault reports & surges",
        "Fault report rate against its baseline, the surge detector's scores and rates, incidents as annotations.",
        panels=(
            reports_vs_baseline(), reports_by_class(), surges_started(),
            row("Surge detector"),
            surge_scores(), surge_rates(), surge_list(), canary_list(),
        ),
        variables=(REGION, SERVICE, APP_VERSION),
        annotations=(incident_annotation(), change_annotation()),
    )
