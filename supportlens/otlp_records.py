"""A Kafka record of the OpenTelemetry Collector's kafka exporter → normalized server spans.

The exporter writes one ``ExportTraceServiceRequest`` a record, as ``otlp_proto`` (its
default) or ``otlp_json``, keyed by trace id or not at all. The encoding is told by the
bytes: OTLP/JSON is a JSON object, anything else is read as protobuf. Both become the
OTLP/JSON form the gateway reads, and :func:`supportlens.otlp.normalize_request` applies
the gateway's rules, so a span means the same whichever way it came in.
"""

from __future__ import annotations

from supportlens.contracts import InvalidRecord, Side
from supportlens.gateway.ingest import RequestRejected, parse_json_object
from supportlens.gateway.otlp_wire import Encoding, decode_export_request
from supportlens.otlp import Normalized, RequestIdRule, normalize_request


def normalize_export_record(data: bytes, rule: RequestIdRule, side: Side = "server",
                            max_bytes: int = 1_048_576) -> Normalized:
    """The spans of one exporter record; ``rejected`` lists each bad span with its path.

    Raises :class:`InvalidRecord` when the record is no export at all (corrupt protobuf,
    JSON that is not an object, over ``max_bytes``).
    """
    if len(data) > max_bytes:
        raise InvalidRecord("OTLP export", f"record is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    first = data.lstrip()[:1]
    try:
        if first in (b"{", b"["):
            payload = parse_json_object(data, "an OTLP ExportTraceServiceRequest")
        else:
            payload = decode_export_request(data, Encoding.PROTOBUF)
            if not payload:
                return Normalized()  # an export of nothing: protobuf writes no field at all
    except RequestRejected as exc:
        raise InvalidRecord("OTLP export", exc.message.removeprefix("body is ")) from None
    return normalize_request(payload, rule, side)
