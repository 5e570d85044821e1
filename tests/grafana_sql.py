"""What Grafana sends to ClickHouse for a panel's SQL: the grafana-clickhouse-datasource
plugin's expansion of template variables and macros, as a pure function.

Three steps, in the plugin's order:
1. ``$__conditionalAll(condition, $var)`` (frontend, ``CHDatasource.applyConditionalAll``):
   ``1=1`` when the variable selects All (or nothing), else the condition.
2. Template variables (Grafana's ``templateSrv.replace`` with the plugin's format function):
   ``${var:singlequote}`` → ``'a','b'`` (``'`` escaped as ``\\'``); a bare ``$var`` / ``${var}``
   of a multi-value variable (all of ours) → ``'a','b'`` (the plugin's format function).
3. Macros (backend, ``pkg/macros/macros.go`` over sqlds' parser: the name ends at a word
   boundary, arguments are split at top-level commas and trimmed), per the plugin README:

   | macro | expansion |
   |---|---|
   | ``$__timeFilter(c)`` | ``c >= toDateTime(from_s) AND c <= toDateTime(to_s)`` |
   | ``$__timeFilter_ms(c)`` | ``c >= fromUnixTimestamp64Milli(from_ms) AND c <= fromUnixTimestamp64Milli(to_ms)`` |
   | ``$__dateFilter(c)`` | ``c >= toDate('YYYY-MM-DD') AND c <= toDate('YYYY-MM-DD')`` |
   | ``$__fromTime`` / ``$__toTime`` | ``toDateTime(from_s)`` / ``toDateTime(to_s)`` |
   | ``$__fromTime_ms`` / ``$__toTime_ms`` | ``fromUnixTimestamp64Milli(ms)`` |
   | ``$__timeInterval(c)`` | ``toStartOfInterval(toDateTime(c), INTERVAL <interval s> second)`` |
   | ``$__timeInterval_ms(c)`` | ``toStartOfInterval(toDateTime64(c, 3), INTERVAL <interval ms> millisecond)`` |
   | ``$__interval_s`` | the interval in whole seconds, at least 1 |

Times are whole seconds (Go's ``time.Unix()`` truncates). An unknown ``$__macro`` raises, so
a typo in a dashboard fails its test instead of reaching ClickHouse as text. So does a macro
argument that is not a plain column name: plugin versions before sqlds' bracket-aware parser
cut arguments at their first ``)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Selection:
    """What a template variable has chosen: some values, or All (which Grafana sends as every value)."""

    values: tuple[str, ...]
    all: bool = False


@dataclass(frozen=True)
class TimeRange:
    from_ms: int
    to_ms: int
    interval_ms: int  # Grafana's interval for the panel: range / max data points, rounded


def expand(sql: str, time_range: TimeRange, variables: Mapping[str, Selection] | None = None) -> str:
    """``sql`` as the plugin sends it to ClickHouse."""
    variables = variables or {}
    sql = _conditional_all(sql, variables)
    sql = _template_variables(sql, variables)
    return _macros(sql, time_range)


# ---- 1. $__conditionalAll ---------------------------------------------------------------------
_CONDITIONAL_ALL = "$__conditionalAll("
_VARIABLE_IN_ARG = re.compile(r"(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+")


def _conditional_all(sql: str, variables: Mapping[str, Selection]) -> str:
    # the plugin works from the last occurrence backwards, replacing the first textual match
    index = sql.rfind(_CONDITIONAL_ALL)
    while index != -1:
        args = _frontend_args(sql, index + len(_CONDITIONAL_ALL) - 1)
        if len(args) != 2:
            return sql
        phrase = args[0]
        match = _VARIABLE_IN_ARG.search(args[1].strip())
        if match:
            chosen = variables.get(match.group(0))
            if chosen is None or chosen.all or not chosen.values:
                phrase = "1=1"
        sql = sql.replace(f"{_CONDITIONAL_ALL}{args[0]},{args[1]})", phrase, 1)
        index = sql.rfind(_CONDITIONAL_ALL)
    return sql


def _frontend_args(sql: str, open_paren: int) -> list[str]:
    """``getMacroArgs``: split at commas at bracket depth 1, untrimmed; [] when unbalanced."""
    rest = sql[open_paren:]
    args, depth, last = [], 0, 1
    for match in re.finditer(r"[(),]", rest):
        token = match.group(0)
        depth += token == "("
        depth -= token == ")"
        if token == "," and depth == 1:
            args.append(rest[last:match.start()])
            last = match.end()
        if depth == 0:
            args.append(rest[last:match.start()])
            return args
    return []


# ---- 2. template variables --------------------------------------------------------------------
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::(\w+))?\}")


def _template_variables(sql: str, variables: Mapping[str, Selection]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            return match.group(0)  # not a variable (e.g. a $__macro): left for the backend
        values = variables[name].values
        fmt = match.group(3)
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
        if fmt is not None:
            raise ValueError(f"format {fmt!r} of ${{{name}}} is not modelled here")
        return "'" + "','".join(values) + "'"  # the plugin's format function; every variable here is multi-value

    return _VARIABLE.sub(replace, sql)


# ---- 3. macros --------------------------------------------------------------------------------
_MACRO = re.compile(r"\$__(\w+)\b")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _macros(sql: str, tr: TimeRange) -> str:
    out, pos = [], 0
    for match in _MACRO.finditer(sql):
        if match.start() < pos:
            continue  # inside the arguments of a macro already expanded
        name = match.group(1)
        args, length = _backend_args(sql[match.end():])
        if length < 0:
            raise ValueError(f"$__{name}: unbalanced brackets")
        out.append(sql[pos:match.start()])
        out.append(_expand_macro(name, args, tr))
        pos = match.end() + length
    out.append(sql[pos:])
    return "".join(out)


def _backend_args(rest: str) -> tuple[list[str], int]:
    """sqlds' ``parseArgs``: ([], 0) without brackets; trimmed args and the length consumed."""
    if not rest.startswith("("):
        return [], 0
    args: list[str] = []
    depth, current = 0, list[str]()
    for i, char in enumerate(rest):
        if char == "(":
            depth += 1
            if depth == 1:
                continue
        elif char == ")":
            depth -= 1
            if depth == 0:
                args.append("".join(current).strip())
                return args, i + 1
        elif char == "," and depth == 1:
            args.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    return [], -1


def _seconds(ms: int) -> int:
    return ms // 1000


def _expand_macro(name: str, args: Sequence[str], tr: TimeRange) -> str:
    def column() -> str:
        if len(args) != 1:
            raise ValueError(f"$__{name}: expected 1 argument, received {len(args)}")
        if not _COLUMN.match(args[0]):
            raise ValueError(f"$__{name}({args[0]}): give a column name (alias an expression in a subquery)")
        return args[0]

    def date(ms: int) -> str:
        return datetime.fromtimestamp(_seconds(ms), tz=timezone.utc).strftime("%Y-%m-%d")

    interval_s = max(tr.interval_ms // 1000, 1)
    match name:
        case "timeFilter":
            c = column()
            return f"{c} >= toDateTime({_seconds(tr.from_ms)}) AND {c} <= toDateTime({_seconds(tr.to_ms)})"
        case "timeFilter_ms":
            c = column()
            return f"{c} >= fromUnixTimestamp64Milli({tr.from_ms}) AND {c} <= fromUnixTimestamp64Milli({tr.to_ms})"
        case "dateFilter":
            c = column()
            return f"{c} >= toDate('{date(tr.from_ms)}') AND {c} <= toDate('{date(tr.to_ms)}')"
        case "fromTime":
            return f"toDateTime({_seconds(tr.from_ms)})"
        case "toTime":
            return f"toDateTime({_seconds(tr.to_ms)})"
        case "fromTime_ms":
            return f"fromUnixTimestamp64Milli({tr.from_ms})"
        case "toTime_ms":
            return f"fromUnixTimestamp64Milli({tr.to_ms})"
        case "timeInterval":
            return f"toStartOfInterval(toDateTime({column()}), INTERVAL {interval_s} second)"
        case "timeInterval_ms":
            return f"toStartOfInterval(toDateTime64({column()}, 3), INTERVAL {max(tr.interval_ms, 1)} millisecond)"
        case "interval_s":
            return str(interval_s)
    raise ValueError(f"$__{name} is not a macro of the ClickHouse plugin (or not modelled here)")
