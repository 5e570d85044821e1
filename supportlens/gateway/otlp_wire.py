"""OTLP/HTTP's two encodings of a trace export: binary protobuf and JSON.

Both become the OTLP/JSON dict form :func:`supportlens.otlp.normalize_request` reads.
The one trap: protobuf's generic JSON mapping writes ``bytes`` fields in base64, while
OTLP/JSON writes trace and span ids in hex (OTLP spec, "JSON Protobuf Encoding"), so ids
are re-encoded here. Answers go back in the encoding of the request.
"""

from __future__ import annotations

import base64
from enum import Enum
from typing import Any

import msgspec
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from supportlens.gateway.ingest import RequestRejected, parse_json_object


class Encoding(str, Enum):
    """The content types of OTLP/HTTP."""

    PROTOBUF = "application/x-protobuf"
    JSON = "application/json"


def encoding_of(content_type: str) -> Encoding:
    """The request's OTLP encoding from its media type; anything else is a 415."""
    try:
        return Encoding(content_type.lower())
    except ValueError:
        raise RequestRejected(
            415, f"Content-Type must be {Encoding.PROTOBUF.value} or {Encoding.JSON.value}, got {content_type!r}"
        ) from None


def decode_export_request(body: bytes, encoding: Encoding) -> dict[str, Any]:
    """An ``ExportTraceServiceRequest`` in OTLP/JSON form (hex ids); 400 when it does not decode."""
    if encoding is Encoding.JSON:
        return parse_json_object(body, "an OTLP ExportTraceServiceRequest")
    message = ExportTraceServiceRequest()
    try:
        message.ParseFromString(body)
    except DecodeError:
        raise RequestRejected(
            400, "body is not a protobuf ExportTraceServiceRequest (the wire format is corrupt)"
        ) from None
    return to_otlp_json(message)


def to_otlp_json(message: ExportTraceServiceRequest) -> dict[str, Any]:
    """The message in OTLP/JSON form: protobuf's JSON mapping, with hex ids instead of base64."""
    payload = MessageToDict(message)
    for resource_spans in payload.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _ids_to_hex(span, ("traceId", "spanId", "parentSpanId"))
                for link in span.get("links", ()):
                    _ids_to_hex(link, ("traceId", "spanId"))
    return payload


def _ids_to_hex(item: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in item:
            item[key] = base64.b64decode(item[key]).hex()


def export_response(encoding: Encoding, rejected: int, message: str) -> bytes:
    """``ExportTraceServiceResponse``: empty when all spans were taken, else OTLP's partial success."""
    if encoding is Encoding.PROTOBUF:
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
        return response.SerializeToString()
    body: dict[str, Any] = {}
    if rejected:
        body["partialSuccess"] = {"rejectedSpans": rejected, "errorMessage": message}
    return msgspec.json.encode(body)
