"""Server spans as a backend's OpenTelemetry SDK exports them, and the Collector's kafka exporter writes them.

The inverse of :mod:`supportlens.otlp` for the fields a backend sets: one resource per
service (``service.name``, ``service.version``, ``cloud.region``), the request id in the
``http.request_id`` attribute, HTTP status and error code in their semantic-convention
attributes, status ERROR for failed spans. A record is one ``ExportTraceServiceRequest``:
``otlp_proto`` (the exporter's default encoding) or ``otlp_json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

import msgspec

from supportlens.contracts import Span
from supportlens.gateway.otlp_wire import to_otlp_json

Encoding = Literal["otlp_proto", "otlp_json"]
REQUEST_ID_ATTRIBUTE = "http.request_id"


def _value(value: str | int | float | bool) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _attributes(values: dict[str, str | int | float | bool]) -> list[KeyValue]:
    return [KeyValue(key=key, value=_value(value)) for key, value in values.items() if value not in ("", None)]


def _hex_bytes(value: str, size: int) -> bytes:
    try:
        return bytes.fromhex(value) if len(value) == 2 * size else b""
    except ValueError:
        return b""


def export_request(spans: Iterable[Span], consent: bool = False) -> ExportTraceServiceRequest:
    """One export of ``spans``, grouped into a resource per (service, version, region).

    ``consent`` marks the resources as apps whose users consented to client tracing (the
    gateway's ``supportlens.consent``), for client spans sent through the gateway."""
    request = ExportTraceServiceRequest()
    resources: dict[tuple[str, str, str], list[OtlpSpan]] = {}
    for span in spans:
        attributes: dict[str, str | int | float | bool] = {REQUEST_ID_ATTRIBUTE: span.request_id,
                                                          "enduser.id": span.user_id,
                                                          "supportlens.account_id": span.account_id,
                                                          "os.type": span.platform, "error.code": span.error_code}
        if span.http_status is not None:
            attributes["http.response.status_code"] = span.http_status
        if span.network is not None:
            attributes |= {"network.carrier.name": span.network.isp, "network.asn": span.network.asn,
                           "network.connection.type": span.network.connection_type}
        attributes.update(span.attributes)
        otlp = OtlpSpan(
            trace_id=_hex_bytes(span.trace_id, 16), span_id=_hex_bytes(span.span_id, 8),
            parent_span_id=_hex_bytes(span.parent_span_id, 8), name=span.operation,
            kind=OtlpSpan.SPAN_KIND_CLIENT if span.side == "client" else OtlpSpan.SPAN_KIND_SERVER,
            start_time_unix_nano=span.start_us * 1000, end_time_unix_nano=(span.start_us + span.duration_us) * 1000,
            attributes=_attributes(attributes),
            status=Status(code=Status.STATUS_CODE_ERROR if span.status == "error" else Status.STATUS_CODE_OK,
                          message=span.error_message),
        )
        resources.setdefault((span.service, span.app_version, span.region), []).append(otlp)
    for (service, version, region), otlp_spans in resources.items():
        resource_spans = request.resource_spans.add()
        resource = {"service.name": service, "service.version": version, "cloud.region": region}
        if consent:
            resource["supportlens.consent"] = "granted"
        resource_spans.resource.attributes.extend(_attributes(resource))
        scope = resource_spans.scope_spans.add()
        scope.scope.name = "supportlens.simulator"
        scope.spans.extend(otlp_spans)
    return request


def encode_export(request: ExportTraceServiceRequest, encoding: Encoding = "otlp_proto") -> bytes:
    """The record the Collector's kafka exporter writes for ``request``."""
    if encoding == "otlp_proto":
        return request.SerializeToString()
    return msgspec.json.encode(to_otlp_json(request))
