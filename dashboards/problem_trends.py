"""Global problem trends: which diagnosis classes hit how many requests and people, over time
and by service, region, network, app version and platform.

Reads ``problem_trends`` (migration 0006): per minute and combination of dimensions, the
sketches of distinct request ids and distinct users. Merging the sketches over a longer
stretch (``uniqMerge``) counts a user once however many minutes they failed in; summing the
per-minute counts (as ``top_problems`` allows) would count them once a minute. Drills are
left out: a replayed incident is not a problem of today.

Misuse found in sequences (issue #18) reads ``misuse_detections`` and the reports traced to
them in ``report_diagnoses`` (migration 0013): the failures that were the client's misuse
although they looked like something else.
"""

from __future__ import annotations

from dashboards.common import (
    APP_VERSION, REGION, SERVICE, Dashboard, Panel, Sql, change_annotation, in_selection, row, stat, table,
    timeseries,
)
from supportlens.store.funnels import Funnel, levels_sql, literal, load_funnels

UID = "supportlens-problem-trends"
# The panels' common WHERE: the time range, no drills, the region / service / app version chosen.
FILTERS = " AND ".join([
    "$__timeFilter(minute)", "NOT drill",
    *(in_selection(column, column) for column in ("region", "service", "app_version")),
])


def failed_requests() -> Panel:
    return stat("Failed requests", "Distinct requests diagnosed as anything but ok.", Sql(
        f"SELECT uniqMergeIf(requests, diagnosis_class != 'ok') AS failed_requests "
        f"FROM problem_trends WHERE {FILTERS}",
        ("failed_requests",),
    ), color="orange")


def affected_users() -> Panel:
    return stat("Affected users", "Distinct users with at least one failed request in the range.", Sql(
        f"SELECT uniqMergeIf(users, diagnosis_class != 'ok') AS affected_users FROM problem_trends WHERE {FILTERS}",
        ("affected_users",),
    ), color="orange")


def failure_share() -> Panel:
    return stat("Share of requests failed", "Failed distinct requests over all distinct requests.", Sql(
        f"SELECT uniqMergeIf(requests, diagnosis_class != 'ok') / greatest(uniqMerge(requests), 1) AS failed_share "
        f"FROM problem_trends WHERE {FILTERS}",
        ("failed_share",),
    ), unit="percentunit", warn_at=0.05, color="green")


def problem_classes() -> Panel:
    return stat("Problem classes seen", "Diagnosis classes other than ok with at least one request.", Sql(
        f"SELECT uniqExactIf(diagnosis_class, diagnosis_class != 'ok') AS classes FROM problem_trends WHERE {FILTERS}",
        ("classes",),
    ))


def _by_class(title: str, description: str, column: str, stacked: bool) -> Panel:
    """One line per diagnosis class of a distinct count the trends table keeps (requests or users)."""
    return timeseries(
        title,
        description,
        Sql(f"""
            SELECT $__timeInterval(minute) AS time, diagnosis_class, uniqMerge({column}) AS {column}
            FROM problem_trends
            WHERE {FILTERS} AND diagnosis_class != 'ok'
            GROUP BY time, diagnosis_class
            ORDER BY time, diagnosis_class
        """, ("time", "diagnosis_class", column), time_series=True),
        **({"stacked": True} if stacked else {}), width=12,
    )


def requests_by_class() -> Panel:
    return _by_class("Failed requests by diagnosis class",
                     "Distinct failed requests per interval, one line per diagnosis class.", "requests", stacked=True)


def users_by_class() -> Panel:
    return _by_class("Affected users by diagnosis class",
                     "Distinct users per interval whose requests failed, one line per diagnosis class.", "users",
                     stacked=False)


def _top_by(title: str, description: str, keys: tuple[str, ...], select: str) -> Panel:
    """The worst values of one dimension: per value and class, distinct requests and users."""
    group = ", ".join(keys)
    return table(title, description, Sql(f"""
        SELECT {select}, diagnosis_class, uniqMerge(requests) AS requests, uniqMerge(users) AS users
        FROM problem_trends
        WHERE {FILTERS} AND diagnosis_class != 'ok'
        GROUP BY {group}, diagnosis_class
        ORDER BY users DESC, requests DESC
        LIMIT 20
    """, (*keys, "diagnosis_class", "requests", "users")), gauges=("users",), width=12, height=9)


def top_by_service() -> Panel:
    return _top_by("Top problems by service", "The service a diagnosis blames (or the request's entry service).",
                   ("service",), "service")


def top_by_region() -> Panel:
    return _top_by("Top problems by region", "Where the failing users are.", ("region",), "region")


def top_by_network() -> Panel:
    return _top_by("Top problems by network", "The users' ISP and connection type.",
                   ("network", "connection_type"), "isp AS network, connection_type")


def top_by_app_version() -> Panel:
    return _top_by("Top problems by app version", "A bad release shows here first.", ("app_version",), "app_version")


def top_by_platform() -> Panel:
    return _top_by("Top problems by platform", "Operating system of the client app.", ("platform",), "platform")


def _funnel_rows(funnel: Funnel) -> str:
    """One funnel per app version and platform: users entering, completing, and the step most drop at
    (the largest loss against the step before; the same rule as ``supportlens funnels``)."""
    n = len(funnel.steps)
    later = ", ".join(literal(step) for step in funnel.steps[1:])
    where = " AND ".join(["$__timeFilter(ts)", in_selection("region", "region"), in_selection("app_version", "app_version")])
    worst = "arrayFirstIndex(x -> x = arrayMax(losses), losses)"
    return f"""
        SELECT {literal(funnel.name)} AS funnel, app_version, platform,
               arrayMap(k -> arrayCount(l -> l >= k, groupArray(level)), range(1, {n + 1})) AS reached,
               arrayMap(i -> reached[i - 1] - reached[i], range(2, {n + 1})) AS losses,
               reached[1] AS entered, reached[{n}] AS completed,
               if(arrayMax(losses) > 0, [{later}][{worst}], '') AS drops_most_at,
               if(arrayMax(losses) > 0, arrayMax(losses) / reached[{worst}], 0) AS drop_share
        FROM ({levels_sql(funnel, ("app_version", "platform"), where)})
        WHERE level > 0
        GROUP BY app_version, platform"""


def funnels() -> Panel:
    """Where users get stuck: the funnels of supportlens/store/funnels.toml (issue #18)."""
    union = "\n        UNION ALL".join(_funnel_rows(f) for f in load_funnels())
    return table(
        "Where users get stuck (funnels)",
        "Per funnel of funnels.toml, app version and platform: consented users who entered, who completed, "
        "and the step most of them never reached (share of those at the step before). Users who withdrew "
        "consent are left out. `supportlens funnels` adds every step and the period before.",
        Sql(f"""
            SELECT funnel, app_version, platform, entered, completed, drops_most_at, drop_share FROM ({union}
            )
            ORDER BY funnel, drop_share DESC, entered DESC
            LIMIT 60
        """, ("funnel", "app_version", "platform", "entered", "completed", "drops_most_at", "drop_share")),
        gauges=("drop_share",), units={"drop_share": "percentunit"}, width=24, height=10)


# Detections carry no region, service or app version: the dashboard's filters do not apply to them.
MISUSE_FILTERS = "$__timeFilter(at) AND NOT drill"
# Traced reports do: the region and app version of the report, the service of the failure it surfaced as.
TRACED_FILTERS = " AND ".join([
    "$__timeFilter(received_at)", "NOT drill", "misuse_detection_id != ''",
    in_selection("region", "region"), in_selection("diagnosis_service", "service"),
    in_selection("app_version", "app_version"),
])


def misuse_by_code() -> Panel:
    return timeseries(
        "Misuse found in sequences",
        "Catalogued misuse found in users' sequences of requests (an idempotency key reused with another "
        "body, an order without a login, polling too fast), per catalog code and interval. Not filtered: "
        "a detection carries no region, service or app version.",
        Sql(f"""
            SELECT $__timeInterval(at) AS time, code, count() AS detections
            FROM misuse_detections FINAL
            WHERE {MISUSE_FILTERS}
            GROUP BY time, code
            ORDER BY time, code
        """, ("time", "code", "detections"), time_series=True),
        bars=True, stacked=True, width=12,
    )


def reports_traced_to_misuse() -> Panel:
    return timeseries(
        "Fault reports traced to misuse",
        "Reports whose failure the sequence rules traced to an earlier misuse, by the misuse and the class "
        "the failure looked like on its own (what it would have been counted as without the trace).",
        Sql(f"""
            SELECT $__timeInterval(received_at) AS time, concat(diagnosis_code, ' as ', diagnosis_surfaced_as) AS traced,
                   count() AS reports
            FROM report_diagnoses FINAL
            WHERE {TRACED_FILTERS}
            GROUP BY time, traced
            ORDER BY time, traced
        """, ("time", "traced", "reports"), time_series=True),
        bars=True, stacked=True, width=12,
    )


def latest_misuse() -> Panel:
    # the inner names differ from the outer aliases: ClickHouse resolves a name to an alias of the same SELECT first
    return table(
        "Latest misuse found in sequences",
        "The newest detections: which account and user, the misusing request and the earlier one it "
        "conflicts with, and the fault reports traced to it (and what they surfaced as). "
        "`supportlens lookup --user` shows the same under the user's timeline.",
        Sql(f"""
            SELECT m.d_at AS at, m.d_code AS code, m.d_rule AS rule, m.d_account AS account_id, m.d_user AS user_id,
                   m.d_request AS request_id, m.d_earlier AS earlier_request_id, t.reports AS reports_traced,
                   t.surfaced AS surfaced_as, m.d_evidence AS evidence
            FROM
            (
                SELECT detection_id, at AS d_at, code AS d_code, rule AS d_rule, account_id AS d_account,
                       user_id AS d_user, request_id AS d_request, earlier_request_id AS d_earlier,
                       evidence AS d_evidence
                FROM misuse_detections FINAL
                WHERE {MISUSE_FILTERS}
            ) AS m
            LEFT JOIN
            (
                SELECT misuse_detection_id, count() AS reports,
                       arrayStringConcat(arraySort(groupUniqArray(diagnosis_surfaced_as)), ', ') AS surfaced
                FROM report_diagnoses FINAL
                WHERE misuse_detection_id != '' AND received_at >= $__fromTime AND NOT drill
                GROUP BY misuse_detection_id
            ) AS t ON t.misuse_detection_id = m.detection_id
            ORDER BY at DESC, request_id
            LIMIT 100
        """, ("at", "code", "rule", "account_id", "user_id", "request_id", "earlier_request_id", "reports_traced",
              "surfaced_as", "evidence")),
        gauges=("reports_traced",), width=24, height=9)


def dashboard() -> Dashboard:
    return Dashboard(
        UID, "supportlens · Global problem trends",
        "Diagnosis classes over time and by dimension, with distinct affected users (ClickHouse problem_trends).",
        panels=(
            failed_requests(), affected_users(), failure_share(), problem_classes(),
            requests_by_class(), users_by_class(),
            row("Where problems are"),
            top_by_service(), top_by_region(), top_by_network(), top_by_app_version(), top_by_platform(),
            row("Where users get stuck"),
            funnels(),
            row("Misuse that fails later"),
            misuse_by_code(), reports_traced_to_misuse(), latest_misuse(),
        ),
        variables=(REGION, SERVICE, APP_VERSION),
        annotations=(change_annotation(),),
    )
