"""Per-request work BentoML 1.4 repeats although its result never changes, done once instead.

`IOMixin.to_http_response` asks the API's output descriptor for its `mime_type()`, which, for an
output without a declared media type (ours return `dict`), builds a pydantic `TypeAdapter` and a
whole JSON schema on every response: ~1.7 ms of the front's ~8 ms CPU per 1-image /classify on the
tiny bundle (bench/serving/results/overhead.md, profile). The answer depends only on the class, so
it is computed once at import and pinned as the descriptor's `media_type`, which `mime_type()`
returns first.
"""
from __future__ import annotations

from typing import Any


def pin_output_media_types(*services: Any) -> None:
    """Set each API's output `media_type` to what `mime_type()` computes today (once)."""
    for svc in services:
        for method in svc.apis.values():
            spec = method.output_spec
            if getattr(spec, "media_type", None) is None:
                spec.media_type = spec.mime_type()
