"""OTLP/JSON traces → normalized :class:`~supportlens.contracts.Span` records.

Input is an ``ExportTraceServiceRequest`` as OpenTelemetry SDKs and the Collector's
Kafka exporter write it in JSON (ids in hex, 64-bit times as decimal strings).
A batch may hold good and bad spans: good ones are normalized, each bad one is
reported with the path of the problem (OTLP's partial-success model), so one
broken span never costs its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from supportlens.contracts import InvalidRecord, Side, Span, explain

# Semantic-convention keys (old and new names) mapped onto span fields.
_HTTP_STATUS_KEYS = ("http.response.status_code", "http.status_code")
_USER_KEYS = ("enduser.id", "user.id")
_ACCOUNT_KEYS = ("supportlens.account_id", "account.id", "enduser.account_id")
_APP_VERSION_KEYS = ("service.version", "app.version")
_PLATFORM_KEYS = ("os.type", "os.name", "device.platform")
_REGION_KEYS = ("supportlens.region", "geo.region", "cloud.region")
_ERROR_CODE_KEYS = ("error.code", "supportlens.error_code", "error.type")
_ISP_KEYS = ("network.carrier.name", "network.isp")
_ASN_KEYS = ("network.asn", "supportlens.network.asn")
_CONNECTION_KEYS = ("network.connection.type", "network.connection.subtype")
_CLIENT_IP_KEYS = ("client.address",)
_CONSUMED = frozenset(
    _HTTP_STATUS_KEYS + _USER_KEYS + _ACCOUNT_KEYS + _APP_VERSION_KEYS + _PLATFORM_KEYS + _REGION_KEYS
    + _ERROR_CODE_KEYS + _ISP_KEYS + _ASN_KEYS + _CONNECTION_KEYS + _CLIENT_IP_KEYS
    + ("service.name", "supportlens.side")
)
_STATUS_ERROR = (2, "STATUS_CODE_ERROR")


@dataclass(frozen=True)
class RequestIdRule:
    """Where the request id comes from: the first attribute present, else (optionally) the trace id."""

    attributes: tuple[str, ...]
    from_trace_id: bool = True


@dataclass
class Normalized:
    spans: list[Span] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def any_value(value: Any) -> Any:
    """Plain Python value of an OTLP ``AnyValue`` (``{"stringValue": "x"}`` → ``"x"``)."""
    if not isinstance(value, Mapping) or not value:
        return None
    kind, inner = next(iter(value.items()))
    if kind == "intValue":
        return _integer(inner, "intValue")
    if kind == "doubleValue":
        try:
            return float(inner)
        except (TypeError, ValueError):
            raise ValueError(f"`doubleValue` is not a number: {str(inner)[:40]!r}") from None
    if kind in ("stringValue", "boolValue", "bytesValue"):
        return inner
    if kind == "arrayValue":
        return [any_value(v) for v in (inner or {}).get("values", [])]
    if kind == "kvlistValue":
        return {kv.get("key"): any_value(kv.get("value")) for kv in (inner or {}).get("values", [])}
    return None


def attributes_dict(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {str(kv["key"]): any_value(kv.get("value")) for kv in items or () if "key" in kv}


def _first(attrs: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value not in (None, ""):
            return value
    return None


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity (an encoder writes null): kept as OTLP/JSON spells them
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, (str, int, float, bool)):
        return value
    return msgspec.json.encode(value).decode()


def _integer(value: Any, what: str) -> int:
    """An OTLP integer: a JSON number or, as OTLP/JSON writes 64-bit ones, a decimal string."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"`{what}` is not an integer: {str(value)[:40]!r}") from None


def _nanos(span: Mapping[str, Any], key: str) -> int:
    raw = span.get(key)
    if raw is None:
        raise ValueError(f"missing `{key}`")
    return _integer(raw, key)


def normalize_span(
    span: Mapping[str, Any],
    resource: Mapping[str, Any],
    rule: RequestIdRule,
    side: Side,
    client_ip: str = "",
) -> Span:
    """One OTLP span (with its resource's attributes) as a normalized :class:`Span`.

    Raises ``ValueError`` or :class:`InvalidRecord` naming the missing or bad field.
    """
    attrs = attributes_dict(span.get("attributes"))
    merged = {**resource, **attrs}  # span attributes win over resource attributes
    trace_id = str(span.get("traceId") or "").lower()
    if trace_id and not _is_hex(trace_id, 32):
        raise ValueError(f"`traceId` is not 32 hex digits: {trace_id[:40]!r}")
    request_id = _first(attrs, rule.attributes) or _first(resource, rule.attributes)
    if request_id is None and rule.from_trace_id and trace_id:
        request_id = trace_id
    if request_id is None:
        raise ValueError(
            f"no request id: none of the attributes {', '.join(rule.attributes)} is set"
            + ("" if rule.from_trace_id else " and taking it from the trace id is switched off")
        )
    start = _nanos(span, "startTimeUnixNano")
    end = _nanos(span, "endTimeUnixNano")
    if end < start:
        raise ValueError("`endTimeUnixNano` is before `startTimeUnixNano`")
    status = span.get("status") or {}
    http_status = _first(attrs, _HTTP_STATUS_KEYS)
    # isdecimal, not isdigit: "²" is a digit that int() cannot read
    http_status = int(http_status) if isinstance(http_status, (int, str)) and str(http_status).isdecimal() else None
    is_error = status.get("code") in _STATUS_ERROR or (http_status is not None and http_status >= 500)
    isp, asn, connection = _first(merged, _ISP_KEYS), _first(merged, _ASN_KEYS), _first(merged, _CONNECTION_KEYS)
    network = None
    if isp or asn or connection:
        # a dict, not a Network: msgspec.convert validates a dict, it takes a struct as it is
        network = {"isp": str(isp or ""), "asn": _integer(asn or 0, "network.asn"),
                   "connection_type": str(connection or "")}
    declared_side = merged.get("supportlens.side")
    final_side = declared_side if declared_side in ("client", "server") else side
    extra = {k: _scalar(v) for k, v in merged.items() if k not in _CONSUMED and k not in rule.attributes}
    if final_side == "server" and merged.get("service.version"):
        # a backend's own version, for the canary comparison (streams.canary); app_version keeps
        # what it always held
        extra["service.version"] = _scalar(merged["service.version"])
    fields = {
        "request_id": str(request_id),
        "trace_id": trace_id,
        "span_id": str(span.get("spanId") or "").lower(),
        "parent_span_id": str(span.get("parentSpanId") or "").lower(),
        "side": final_side,
        "service": str(resource.get("service.name") or "unknown_service"),
        "operation": str(span.get("name") or ""),
        "start_us": start // 1000,
        "duration_us": (end - start) // 1000,
        "status": "error" if is_error else "ok",
        "http_status": http_status,
        "error_code": str(_first(attrs, _ERROR_CODE_KEYS) or ""),
        "error_message": str(status.get("message") or ""),
        # the caller's address belongs to client spans only: a backend's span never carries it
        "client_ip": (client_ip or str(_first(attrs, _CLIENT_IP_KEYS) or "")) if final_side == "client" else "",
        "user_id": str(_first(merged, _USER_KEYS) or ""),
        "account_id": str(_first(merged, _ACCOUNT_KEYS) or ""),
        "app_version": str(_first(merged, _APP_VERSION_KEYS) or ""),
        "platform": str(_first(merged, _PLATFORM_KEYS) or ""),
        "region": str(_first(merged, _REGION_KEYS) or ""),
        "network": network,
        "attributes": extra,
    }
    try:
        return msgspec.convert(fields, Span)
    except msgspec.ValidationError as exc:
        raise InvalidRecord("span", explain(str(exc))) from None


def normalize_request(
    payload: Mapping[str, Any], rule: RequestIdRule, side: Side, client_ip: str = ""
) -> Normalized:
    """Every span of an ``ExportTraceServiceRequest``; bad spans are listed with their path."""
    out = Normalized()
    resource_spans = payload.get("resourceSpans")
    if not isinstance(resource_spans, list):
        out.rejected.append("resourceSpans: missing or not a list")
        return out
    for r, resource_span in enumerate(resource_spans):
        try:
            if not isinstance(resource_span, Mapping):
                raise ValueError("not an object")
            resource = attributes_dict((resource_span.get("resource") or {}).get("attributes"))
            scope_spans = resource_span.get("scopeSpans") or []
            if not isinstance(scope_spans, list):
                raise ValueError("`scopeSpans` is not a list")
        except _SHAPE_ERRORS as exc:
            out.rejected.append(f"resourceSpans[{r}]: {_shape(exc)}")
            continue
        for s, scope_span in enumerate(scope_spans):
            spans = scope_span.get("spans") if isinstance(scope_span, Mapping) else None
            if not isinstance(spans, list):
                if scope_span:
                    out.rejected.append(f"resourceSpans[{r}].scopeSpans[{s}]: `spans` is not a list")
                continue
            for i, span in enumerate(spans):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                try:
                    if not isinstance(span, Mapping):
                        raise ValueError("not an object")
                    out.spans.append(normalize_span(span, resource, rule, side, client_ip))
                except InvalidRecord as exc:
                    out.rejected.append(f"{where}: {exc.reason}")
                except _SHAPE_ERRORS as exc:
                    out.rejected.append(f"{where}: {_shape(exc)}")
    return out


# A JSON value of the wrong shape (a string where OTLP has an object) surfaces as any of these.
_SHAPE_ERRORS = (ValueError, TypeError, KeyError, AttributeError)


def _shape(exc: Exception) -> str:
    return str(exc) if isinstance(exc, ValueError) else "a field that must be an object or list is not"


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdef" for c in value)
