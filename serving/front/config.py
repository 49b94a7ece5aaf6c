"""The service's configuration: every knob from a `CLIPHEADS_*` environment variable, read once at
import (BentoML's service decorators take their limits at class-definition time)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..images import DEFAULT_MAX_PIXELS
from .decode_budget import DecodeBudget

# What the front exposes: API routes (guarded), admin routes (only when enabled), open probes.
API_ROUTES = frozenset({"/classify", "/zero_shot", "/tasks", "/tasks/list", "/tasks/delete"})
ADMIN_ROUTES = frozenset({"/admin/reload"})
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else default


@dataclass(frozen=True)
class ServeConfig:
    """All knobs, from `CLIPHEADS_*` environment variables (defaults in parentheses)."""

    source: str = ""  # CLIPHEADS_SOURCE: bundle dir or *.head.safetensors (required)
    runtime: str = "auto"  # CLIPHEADS_RUNTIME: auto|onnx|onnx-cpu|onnx-cuda|torch|tensorrt
    backbone_weights: str = ""  # CLIPHEADS_BACKBONE_WEIGHTS: where a head file's backbone weights are now
    # CLIPHEADS_TASKS_STORE (or CLIPHEADS_TASKS_DIR): few-shot tasks in a directory or a postgresql:// URL ("" = memory)
    tasks_store: str = field(default="", repr=False)
    # CLIPHEADS_TASKS_STORE_TIMEOUT_S: a task-store call (a database query) that takes longer is a 503
    tasks_store_timeout_s: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024  # CLIPHEADS_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS  # CLIPHEADS_MAX_PIXELS (per image, from the header)
    max_request_pixels: int = DecodeBudget.request_pixels  # CLIPHEADS_MAX_REQUEST_PIXELS: decode pixels per request
    max_decode_pixels: int = DecodeBudget.process_pixels  # CLIPHEADS_MAX_DECODE_PIXELS: large-image pixels decoding at once
    large_image_pixels: int = DecodeBudget.large_pixels  # CLIPHEADS_LARGE_IMAGE_PIXELS: above it, the large lane
    max_images: int = 32  # CLIPHEADS_MAX_IMAGES per request
    max_examples: int = 64  # CLIPHEADS_MAX_EXAMPLES per POST /tasks
    max_labels: int = 256  # CLIPHEADS_MAX_LABELS per request
    max_label_chars: int = 100  # CLIPHEADS_MAX_LABEL_CHARS
    max_templates: int = 16  # CLIPHEADS_MAX_TEMPLATES
    max_concurrency: int = 64  # CLIPHEADS_MAX_CONCURRENCY in-flight API requests, then 429
    timeout_s: int = 30  # CLIPHEADS_TIMEOUT_S per request once its body has arrived, then 504
    body_timeout_s: float = 10.0  # CLIPHEADS_BODY_TIMEOUT_S: the whole body must arrive within it, else 408
    header_timeout_s: float = 10.0  # CLIPHEADS_HEADER_TIMEOUT_S: a request's line + headers, else 408 (http_layer.py)
    max_uploads: int = 1024  # CLIPHEADS_MAX_UPLOADS: requests whose body is still arriving, then 429
    max_upload_bytes: int = 1024 * 1024 * 1024  # CLIPHEADS_MAX_UPLOAD_BYTES: bytes of bodies still arriving, then 503
    max_batch_size: int = 64  # CLIPHEADS_MAX_BATCH_SIZE images per encoder pass
    # CLIPHEADS_BATCH_WAIT_MS: when the front reports a backlog (>= 4 requests on their way), a pass waits
    # up to this long for them (encoder/batching.py). 0 = never (the default: on 2 cores it helped at
    # c=32 and was no better or worse at c=2/8, bench/serving/results/README.md)
    batch_wait_ms: int = 0
    decode_threads: int = 2  # CLIPHEADS_DECODE_THREADS
    inline_decode_pixels: int = DecodeBudget.inline_pixels  # CLIPHEADS_INLINE_DECODE_PIXELS: at most, on the event loop
    grace_s: int = 30  # CLIPHEADS_GRACE_S: after SIGTERM, how long in-flight requests get to finish
    allow_reload: bool = False  # CLIPHEADS_ALLOW_RELOAD=1: POST /admin/reload (needs an auth token)
    reload_root: str = ""  # CLIPHEADS_RELOAD_ROOT: reload paths must lie inside (default: the source's folder)
    auth_token: str = field(default="", repr=False)  # CLIPHEADS_AUTH_TOKEN: bearer token; "" = no auth
    fast_classify: bool = True  # CLIPHEADS_FAST_CLASSIFY=0: POST /classify through BentoML's request path (fast.py)
    # CLIPHEADS_FRONT_WORKERS: front processes sharing the port and the one encoder. Each front is one
    # Python event loop (HTTP, decode): ~300 one-image requests/s on the tiny CLIP here, so a many-core
    # box feeding a GPU needs several; on 2 cores one is faster (bench/serving/results/README.md).
    # Limits above (concurrency, uploads, decode budgets) are per front. More than 1 needs a shared
    # few-shot task store: an in-memory one would give each front its own tasks.
    front_workers: int = 1

    @property
    def admin_enabled(self) -> bool:
        """Admin routes exist only when asked for and protected by a token (B5 #20)."""
        return self.allow_reload and bool(self.auth_token)

    @property
    def encoder_timeout_s(self) -> int:
        """Encoder calls; also the admin routes' request timeout (a reload loads a model)."""
        return max(self.timeout_s * 2, 60)

    @property
    def backstop_timeout_s(self) -> float:
        """BentoML's own request timeout (its TimeoutMiddleware wraps the guard and counts the
        upload too): later than any answer of ours, so the client always gets our 408/504."""
        return self.body_timeout_s + self.encoder_timeout_s + 5

    @property
    def backstop_concurrency(self) -> int:
        """BentoML's own concurrency limit (it counts requests from their first byte, uploads
        included): above ours, so the client always gets our 429."""
        return self.max_uploads + self.max_concurrency + 64

    @classmethod
    def from_env(cls) -> "ServeConfig":
        e = os.environ.get
        d = cls()
        return cls(
            source=e("CLIPHEADS_SOURCE", ""),
            runtime=e("CLIPHEADS_RUNTIME", "auto") or "auto",
            backbone_weights=e("CLIPHEADS_BACKBONE_WEIGHTS", ""),
            tasks_store=e("CLIPHEADS_TASKS_STORE", "") or e("CLIPHEADS_TASKS_DIR", ""),
            tasks_store_timeout_s=_env_float("CLIPHEADS_TASKS_STORE_TIMEOUT_S", d.tasks_store_timeout_s),
            max_body_bytes=_env_int("CLIPHEADS_MAX_BODY_BYTES", d.max_body_bytes),
            max_pixels=_env_int("CLIPHEADS_MAX_PIXELS", d.max_pixels),
            max_request_pixels=_env_int("CLIPHEADS_MAX_REQUEST_PIXELS", d.max_request_pixels),
            max_decode_pixels=_env_int("CLIPHEADS_MAX_DECODE_PIXELS", d.max_decode_pixels),
            large_image_pixels=_env_int("CLIPHEADS_LARGE_IMAGE_PIXELS", d.large_image_pixels),
            max_images=_env_int("CLIPHEADS_MAX_IMAGES", d.max_images),
            max_examples=_env_int("CLIPHEADS_MAX_EXAMPLES", d.max_examples),
            max_labels=_env_int("CLIPHEADS_MAX_LABELS", d.max_labels),
            max_label_chars=_env_int("CLIPHEADS_MAX_LABEL_CHARS", d.max_label_chars),
            max_templates=_env_int("CLIPHEADS_MAX_TEMPLATES", d.max_templates),
            max_concurrency=_env_int("CLIPHEADS_MAX_CONCURRENCY", d.max_concurrency),
            timeout_s=_env_int("CLIPHEADS_TIMEOUT_S", d.timeout_s),
            body_timeout_s=_env_float("CLIPHEADS_BODY_TIMEOUT_S", d.body_timeout_s),
            header_timeout_s=_env_float("CLIPHEADS_HEADER_TIMEOUT_S", d.header_timeout_s),
            max_uploads=_env_int("CLIPHEADS_MAX_UPLOADS", d.max_uploads),
            max_upload_bytes=_env_int("CLIPHEADS_MAX_UPLOAD_BYTES", d.max_upload_bytes),
            max_batch_size=_env_int("CLIPHEADS_MAX_BATCH_SIZE", d.max_batch_size),
            batch_wait_ms=_env_int("CLIPHEADS_BATCH_WAIT_MS", d.batch_wait_ms),
            decode_threads=_env_int("CLIPHEADS_DECODE_THREADS", d.decode_threads),
            inline_decode_pixels=_env_int("CLIPHEADS_INLINE_DECODE_PIXELS", d.inline_decode_pixels),
            grace_s=_env_int("CLIPHEADS_GRACE_S", d.grace_s),
            allow_reload=e("CLIPHEADS_ALLOW_RELOAD", "") in ("1", "true", "yes"),
            reload_root=e("CLIPHEADS_RELOAD_ROOT", ""),
            auth_token=e("CLIPHEADS_AUTH_TOKEN", ""),
            fast_classify=e("CLIPHEADS_FAST_CLASSIFY", "1") not in ("0", "false", "no"),
            front_workers=max(1, _env_int("CLIPHEADS_FRONT_WORKERS", d.front_workers)),
        )


CONFIG = ServeConfig.from_env()
