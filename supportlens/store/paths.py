"""What users did before they complained (issue #18): paths of behaviour and requests.

For one fault report: the user's consented behaviour events (screens and actions) and their
requests (operations, with what went wrong) in the ``within_s`` before it, in time order —
what a support person reads before answering "how do I use this?". Across the reports of a
window: the most common paths, per diagnosis class, made of the last ``steps`` behaviour
steps before each report ("most users who report client_misuse came from checkout").

Consent: behaviour is stored only with the user's consent (the gateway withholds the rest),
and a user who withdrew it (a ``consent_withdrawn`` behaviour event, at any time up to the
query) is in no path and no count from then on. A path exists only for a user with consented
behaviour in its window: a user who never consented has none, not even of requests (those
stay where they always were, in ``lookup --ip``).
"""

from __future__ import annotations

import msgspec
from clickhouse_connect.driver.client import Client

BEFORE_S = 600
WITHDRAWN = "consent_withdrawn"
_WITHDRAWN_USERS = f"SELECT user_id FROM behaviour WHERE name = '{WITHDRAWN}'"


class PathStep(msgspec.Struct, frozen=True, kw_only=True):
    at_us: int
    kind: str  # behaviour | request
    what: str  # "checkout: start_checkout" (screen: action), or the request's operation
    outcome: str = ""  # a request's diagnosis class


class CommonPath(msgspec.Struct, frozen=True, kw_only=True):
    diagnosis_class: str
    path: list[str]  # the last steps before the report, oldest first
    reports: int
    share: float  # of the class's reports with a consented path


class CommonPaths(msgspec.Struct, frozen=True, kw_only=True):
    since_us: int
    until_us: int
    steps: int
    paths: list[CommonPath]
    without_path: dict[str, int]  # per class: reports whose user left no consented behaviour before


def step_name(screen: str, name: str) -> str:
    return f"{screen}: {name}" if screen and name != screen else (screen or name)


def path_before(client: Client, user_id: str, until_us: int, within_s: int = BEFORE_S, limit: int = 50) -> list[PathStep]:
    """The user's behaviour and requests in the ``within_s`` before ``until_us``, oldest first;
    empty when the user left no consented behaviour there (or withdrew consent)."""
    if not user_id:
        return []
    params = {"user": user_id, "since": until_us - within_s * 1_000_000, "until": until_us, "limit": limit}
    window = "BETWEEN fromUnixTimestamp64Micro({since:Int64}) AND fromUnixTimestamp64Micro({until:Int64})"
    behaviour = client.query(
        f"SELECT toUnixTimestamp64Micro(ts), screen, name FROM behaviour FINAL "
        f"WHERE user_id = {{user:String}} AND ts {window} AND name != '{WITHDRAWN}' "
        f"AND user_id NOT IN ({_WITHDRAWN_USERS} AND user_id = {{user:String}}) "
        "ORDER BY ts DESC LIMIT {limit:UInt32}", parameters=params).result_rows
    if not behaviour:
        return []
    requests = client.query(
        "SELECT toUnixTimestamp64Micro(start), operation, diagnosis_class FROM requests "
        f"WHERE user_id = {{user:String}} AND start {window} AND NOT drill "
        "ORDER BY request_id, version DESC LIMIT 1 BY request_id", parameters=params).result_rows
    steps = [PathStep(at_us=r[0], kind="behaviour", what=step_name(r[1], r[2])) for r in behaviour]
    steps += [PathStep(at_us=r[0], kind="request", what=r[1], outcome=r[2]) for r in requests]
    steps.sort(key=lambda s: (s.at_us, s.kind))
    return steps[-limit:]


def summary(steps: list[PathStep]) -> str:
    """One line: the steps in order, repeats folded ("checkout: view ×3"), failures named."""
    parts: list[str] = []
    last, count = "", 0
    for step in steps:
        label = step.what + (f" ({step.outcome})" if step.kind == "request" and step.outcome not in ("", "ok") else "")
        if label == last:
            count += 1
            parts[-1] = f"{label} ×{count}"
            continue
        last, count = label, 1
        parts.append(label)
    return " → ".join(parts)


def common_paths(client: Client, since_us: int, until_us: int, steps: int = 3, per_class: int = 5,
                 within_s: int = BEFORE_S) -> CommonPaths:
    """Per diagnosis class, the most common last ``steps`` behaviour steps before its reports."""
    from supportlens.store.lookup import LookupInputError  # lookup imports this module

    if not 1 <= steps <= 10:
        raise LookupInputError(f"--steps must be from 1 to 10, got {steps}", hint="e.g. --steps 3")
    params = {"since": since_us, "until": until_us, "within": within_s, "steps": steps, "per_class": per_class}
    per_report = (
        "SELECT d.report_id AS report_id, any(d.diagnosis_class) AS cls, "
        "arraySlice(arrayMap(x -> x.2, arraySort(x -> x.1, groupArray((b.ts, "
        "if(b.screen != '' AND b.name != b.screen, concat(b.screen, ': ', b.name), "
        "if(b.screen != '', b.screen, b.name)))))), -{steps:UInt32}) AS path "
        "FROM (SELECT report_id, user_id, received_at, diagnosis_class FROM report_diagnoses FINAL "
        "      WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "      AND received_at < fromUnixTimestamp64Micro({until:Int64}) AND NOT drill AND user_id != '' "
        f"      AND user_id NOT IN ({_WITHDRAWN_USERS})) AS d "
        "INNER JOIN (SELECT user_id, ts, screen, name FROM behaviour FINAL "
        f"      WHERE name != '{WITHDRAWN}' "
        "      AND ts >= fromUnixTimestamp64Micro({since:Int64}) - toIntervalSecond({within:UInt32}) "
        "      AND ts < fromUnixTimestamp64Micro({until:Int64})) AS b ON b.user_id = d.user_id "
        "WHERE b.ts <= d.received_at AND b.ts >= d.received_at - toIntervalSecond({within:UInt32}) "
        "GROUP BY d.report_id"
    )
    rows = client.query(
        f"SELECT cls, path, count() AS reports, reports / sum(reports) OVER (PARTITION BY cls) AS share "
        f"FROM ({per_report}) GROUP BY cls, path "
        "ORDER BY cls, reports DESC, path LIMIT {per_class:UInt32} BY cls", parameters=params).result_rows
    with_path = client.query(f"SELECT cls, count() FROM ({per_report}) GROUP BY cls", parameters=params).result_rows
    all_reports = client.query(
        "SELECT diagnosis_class, count() FROM report_diagnoses FINAL "
        "WHERE received_at >= fromUnixTimestamp64Micro({since:Int64}) "
        "AND received_at < fromUnixTimestamp64Micro({until:Int64}) AND NOT drill GROUP BY diagnosis_class",
        parameters=params).result_rows
    having = dict(with_path)
    return CommonPaths(
        since_us=since_us, until_us=until_us, steps=steps,
        paths=[CommonPath(diagnosis_class=r[0], path=list(r[1]), reports=r[2], share=round(r[3], 4)) for r in rows],
        without_path={cls: n - having.get(cls, 0) for cls, n in sorted(all_reports) if n - having.get(cls, 0)})
