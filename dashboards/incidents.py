"""Incidents & VIP impact: open incidents, their history, and the VIP accounts told about them.

Incidents come from ``incidents`` (every transition) and ``incidents_current`` (the latest
one per incident), migration 0008. ClickHouse has no accounts table (accounts live on the
compacted ``accounts`` topic), so a VIP account shows here through what the notifier did
for it: only VIP accounts that an incident affected get an ``incident_declared``
notification (DESIGN.md §6), and ``notification_deliveries`` records every attempt.
"""

from __future__ import annotations

from dashboards.common import (
    SERVICE, Annotation, Dashboard, Panel, Sql, change_annotation, row, stat, table, timeseries,
)

UID = "supportlens-incidents"
# Incidents implicate services (an array); the service variable keeps those naming a chosen one.
SERVICE_FILTER = "$__conditionalAll(hasAny(services, [${service:singlequote}]), $service)"
OPEN = f"state != 'resolved' AND NOT drill AND {SERVICE_FILTER}"


def incident_annotation() -> Annotation:
    """Each incident as a region from its start to its resolution (or the end of the range while open)."""
    # the inner names differ from the outer aliases: ClickHouse resolves a name to an alias of the same SELECT first
    return Annotation("Incidents", Sql("""
        SELECT started_at AS time, ifNull(resolved_at, $__toTime) AS timeEnd,
               concat(incident_id, ' (', severity, ', ', state, ')') AS title,
               concat(headline, ': ', reason) AS text,
               arrayStringConcat(arrayConcat([severity, root_key], services), ',') AS tags
        FROM
        (
            SELECT incident_id, started_at, resolved_at, severity, state, title AS headline, reason, root_key, services
            FROM incidents_current
            WHERE started_at <= $__toTime AND (resolved_at IS NULL OR resolved_at >= $__fromTime) AND NOT drill
        )
        ORDER BY time
    """, ("time", "timeEnd", "title", "text", "tags")), color="red")


def open_incidents_count() -> Panel:
    return stat("Incidents open now", "Incidents not resolved yet (drills left out), whatever the time range.", Sql(
        f"SELECT count() AS open_incidents FROM incidents_current WHERE {OPEN}", ("open_incidents",),
    ), warn_at=1, color="green")


def vip_accounts_notified() -> Panel:
    return stat("VIP accounts told of an incident", "Distinct accounts that got an incident notification.", Sql(
        "SELECT uniqExact(account_id) AS vip_accounts FROM notifications FINAL "
        "WHERE $__timeFilter(created_at) AND kind = 'incident_declared' AND NOT drill",
        ("vip_accounts",),
    ))


def deliveries_failed() -> Panel:
    return stat("Failed delivery attempts", "Notification attempts that failed or were given up.", Sql(
        "SELECT countIf(outcome IN ('failed', 'dead_lettered')) AS failed_attempts FROM notification_deliveries FINAL "
        "WHERE $__timeFilter(at) AND NOT drill",
        ("failed_attempts",),
    ), warn_at=1, color="green")


def affected_users_open() -> Panel:
    return stat("Users in open incidents", "Affected users summed over the open incidents.", Sql(
        f"SELECT sum(affected_users) AS affected_users FROM incidents_current WHERE {OPEN}", ("affected_users",),
    ), color="orange")


def open_incidents() -> Panel:
    return table("Open incidents", "Latest state of every open incident, most severe first.", Sql(f"""
        SELECT incident_id, severity, state, started_at, dateDiff('minute', started_at, now64(6)) AS open_minutes,
               title, root_key, arrayStringConcat(services, ', ') AS implicated_services,
               arrayStringConcat(teams, ', ') AS owner_teams,
               affected_users, reason
        FROM incidents_current
        WHERE {OPEN}
        ORDER BY severity, started_at
    """, ("incident_id", "severity", "state", "started_at", "open_minutes", "title", "root_key",
          "implicated_services", "owner_teams", "affected_users", "reason")),
        width=24, height=7, units={"open_minutes": "m"})


def incidents_in_range() -> Panel:
    return table("Incidents in the time range", "Every incident active at some point of the range.", Sql(f"""
        SELECT incident_id, severity, state, started_at, resolved_at,
               dateDiff('minute', started_at, ifNull(resolved_at, now64(6))) AS duration_minutes,
               title, root_key, affected_users
        FROM incidents_current
        WHERE started_at <= $__toTime AND (resolved_at IS NULL OR resolved_at >= $__fromTime)
          AND NOT drill AND {SERVICE_FILTER}
        ORDER BY started_at DESC
        LIMIT 200
    """, ("incident_id", "severity", "state", "started_at", "resolved_at", "duration_minutes", "title", "root_key",
          "affected_users")), width=24, height=8, units={"duration_minutes": "m"})


def transitions() -> Panel:
    return timeseries("Incident transitions", "Lifecycle events written per interval: declared, updated, escalated, "
                      "mitigated, resolved.", Sql(f"""
        SELECT $__timeInterval(at) AS time, transition, count() AS transitions
        FROM incidents FINAL
        WHERE $__timeFilter(at) AND NOT drill AND {SERVICE_FILTER}
        GROUP BY time, transition
        ORDER BY time, transition
    """, ("time", "transition", "transitions"), time_series=True), bars=True, stacked=True, width=12)


def affected_vip_accounts() -> Panel:
    return table(
        "Affected VIP accounts",
        "VIP accounts an incident affected, as the notifier told them (no accounts table in ClickHouse: "
        "only affected VIP accounts are notified), with the outcome of the latest delivery attempt.",
        Sql(f"""
            SELECT n.account_id AS account_id, n.incident_id AS incident_id, n.created_at AS notified_at,
                   n.channel AS channel, n.locale AS locale, n.subject AS subject,
                   d.attempts AS attempts, if(d.attempts = 0, 'pending', d.outcome) AS last_outcome
            FROM
            (
                SELECT account_id, notification_id, incident_id, created_at, channel, locale, subject
                FROM notifications FINAL
                WHERE $__timeFilter(created_at) AND kind = 'incident_declared' AND NOT drill
                  AND incident_id IN (SELECT incident_id FROM incidents_current WHERE {SERVICE_FILTER})
            ) AS n
            LEFT JOIN
            (
                SELECT notification_id, max(attempt) AS attempts, argMax(outcome, attempt) AS outcome
                FROM notification_deliveries FINAL
                GROUP BY notification_id
            ) AS d ON d.notification_id = n.notification_id
            ORDER BY notified_at DESC
            LIMIT 200
        """, ("account_id", "incident_id", "notified_at", "channel", "locale", "subject", "attempts", "last_outcome")),
        width=24, height=9,
    )


def deliveries_by_outcome() -> Panel:
    return timeseries("Notification deliveries by outcome", "Delivery attempts per interval: delivered, failed, "
                      "rate limited, dead-lettered.", Sql("""
        SELECT $__timeInterval(at) AS time, outcome, count() AS attempts
        FROM notification_deliveries FINAL
        WHERE $__timeFilter(at) AND NOT drill
        GROUP BY time, outcome
        ORDER BY time, outcome
    """, ("time", "outcome", "attempts"), time_series=True), bars=True, stacked=True, width=12)


def notifications_by_kind() -> Panel:
    return table("Notifications by kind and channel", "Incident notices, resolutions and misuse advice sent.", Sql("""
        SELECT kind, channel, count() AS notifications, uniqExact(account_id) AS accounts
        FROM notifications FINAL
        WHERE $__timeFilter(created_at) AND NOT drill
        GROUP BY kind, channel
        ORDER BY notifications DESC
    """, ("kind", "channel", "notifications", "accounts")), width=12, height=8, gauges=("notifications",))


def dashboard() -> Dashboard:
    return Dashboard(
        UID, "supportlens · Incidents & VIP impact",
        "Open incidents, their history, and the VIP accounts notified about them (ClickHouse incidents, "
        "notifications, notification_deliveries).",
        panels=(
            open_incidents_count(), affected_users_open(), vip_accounts_notified(), deliveries_failed(),
            open_incidents(), incidents_in_range(), transitions(), notifications_by_kind(),
            row("VIP impact"),
            affected_vip_accounts(), deliveries_by_outcome(),
        ),
        variables=(SERVICE,),
        annotations=(incident_annotation(), change_annotation()),
        time_from="now-24h",
    )
