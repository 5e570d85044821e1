"""Hand-made spans of one request (``r1``) for pure tests of correlation and diagnosis."""

from __future__ import annotations

from supportlens.contracts import Span

T0 = 1_763_784_000_000_000


def client(**kw) -> Span:
    base = dict(request_id="r1", span_id="c1", side="client", service="mobile-app", operation="POST /v1/orders",
                start_us=T0, duration_us=400_000, status="ok", http_status=201, client_ip="203.0.113.7",
                app_version="5.3.1", platform="ios")
    return Span(**{**base, **kw})


def server(service: str, span_id: str, parent: str, start_ms: float, duration_ms: float, **kw) -> Span:
    base = dict(request_id="r1", span_id=span_id, parent_span_id=parent, side="server", service=service,
                operation=f"{service}.op", start_us=T0 + int(start_ms * 1000), duration_us=int(duration_ms * 1000),
                status="ok", http_status=200)
    return Span(**{**base, **kw})
