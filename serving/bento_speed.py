"""Per-request work BentoML 1.4 does that we do once, or not at all on the hot path.

`IOMixin.to_http_response` asks the API's output descriptor for its `mime_type()`, which, for an
output without a declared media type (ours return `dict`), builds a pydantic `TypeAdapter` and a
whole JSON schema on every response: ~1.7 ms of the front's ~8 ms CPU per 1-image /classify on the
tiny bundle (bench/serving/results/overhead.md, profile). The answer depends only on the class, so
it is computed once at import and pinned as the descriptor's `media_type`, which `mime_type()`
returns first.
"""
from __future__ import annotations

from typing import Any

_OUTERMOST: dict[str, list] = {}


def pin_output_media_types(*services: Any) -> None:
    """Set each API's output `media_type` to what `mime_type()` computes today (once)."""
    for svc in services:
        for method in svc.apis.values():
            spec = method.output_spec
            if getattr(spec, "media_type", None) is None:
                spec.media_type = spec.mime_type()


def install_outermost(service_name: str, cls: type, **options: Any) -> None:
    """Put `cls(app, **options)` outside every middleware of `service_name`'s app. BentoML puts its
    own (metrics, OpenTelemetry, access log, timeout, concurrency: ~1.5 ms of CPU per request on
    the front) outside the ones a service adds, with no setting to change the order; the fast
    path (front/fast.py) must enter before them."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.middleware import Middleware

    _OUTERMOST.setdefault(service_name, []).append(Middleware(cls, **options))
    current = ServiceAppFactory.middlewares.fget
    if getattr(current, "_clipheads_outermost", False):
        return

    def middlewares(self) -> list:
        return [*_OUTERMOST.get(self.service.name, ()), *current(self)]

    middlewares._clipheads_outermost = True  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)
