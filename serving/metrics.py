"""The service's Prometheus metrics (on /metrics next to BentoML's own), and bounded `endpoint`
labels for BentoML's HTTP metrics.

Ours: `clipheads_*` below, shared by the front and the encoder (BentoML's multiprocess registry
merges the processes).

BentoML 1.4 labels its request metrics with the raw URL path, so every distinct path a client
sends (`DELETE /tasks/<name>`, a scanner's random 404s, even 401s) creates Prometheus series that
live as long as the process. Measured on the micro head: 15,000 distinct `DELETE /tasks/<name>`
paths took the front from 111 to 533 MiB and `/metrics` from 2 to 59 MB (a scrape took seconds);
that was the front's residual 4 MiB/min in the soak (bench/serving/soak/README.md).

`install_bounded_labels()` swaps BentoML's metrics middleware for a subclass that labels a request with its
route, a route template (`/tasks/{name}`) or `(unmatched)`, and hands the app the real path.
"""
from __future__ import annotations

import bentoml
from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments

UNMATCHED = "(unmatched)"
# BentoML's own routes on every service (besides each service's API routes).
FIXED_ROUTES = frozenset({"/", "/docs.json", "/schema.json", "/metrics", "/livez", "/readyz", "/healthz"})
# Paths with a client-chosen part, and the template they are counted under.
TEMPLATES = (("/tasks/", "/tasks/{name}"), ("/static_content/", "/static_content/{file}"))
_REAL_PATH = "clipheads.real_path"  # ASGI scope key: the path the metrics label stood in for


def endpoint_label(path: str, routes: frozenset[str]) -> str:
    """The metrics label of a request path: one of a fixed, small set whatever clients send."""
    if path in routes or path in FIXED_ROUTES:
        return path
    for prefix, template in TEMPLATES:
        if path.startswith(prefix):
            return template
    return UNMATCHED


def _restore_real_path(app):
    async def restore(scope, receive, send):
        real = scope.get(_REAL_PATH)
        if real is not None:
            scope = {k: v for k, v in scope.items() if k != _REAL_PATH}
            scope["path"] = real
        await app(scope, receive, send)

    return restore


class BoundedEndpointMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's metrics middleware, shown the label instead of the path; the app below it still
    sees the real path."""

    def __init__(self, app, **kwargs):
        super().__init__(_restore_real_path(app), **kwargs)
        self._routes: frozenset[str] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"].startswith(("http", "websocket")):
            if self._routes is None:  # known once the worker has loaded its service
                self._routes = frozenset(server_context.service_routes)
            label = endpoint_label(scope["path"], self._routes)
            if label != scope["path"]:
                scope = {**scope, "path": label, _REAL_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


def install_bounded_labels() -> None:
    """Make BentoML build its HTTP metrics middleware from `BoundedEndpointMetrics`. BentoML imports
    the class when it builds a worker's app, after the service module (which calls this) loads."""
    instruments.RunnerTrafficMetricsMiddleware = BoundedEndpointMetrics


# ---- ours ---------------------------------------------------------------------------------
REQUESTS = bentoml.metrics.Counter(
    name="clipheads_requests_total", documentation="API requests by endpoint and status",
    labelnames=["endpoint", "status"],
)
TASK_PREDICTIONS = bentoml.metrics.Counter(
    name="clipheads_task_predictions_total", documentation="Images classified per task", labelnames=["task"],
)
IMAGES = bentoml.metrics.Counter(
    name="clipheads_images_total", documentation="Images encoded per runtime", labelnames=["runtime"],
)
REJECTIONS = bentoml.metrics.Counter(
    name="clipheads_rejections_total", documentation="Rejected requests by error kind", labelnames=["kind"],
)
IN_FLIGHT = bentoml.metrics.Gauge(
    name="clipheads_in_flight", documentation="API requests being processed (admitted by the guard)",
    multiprocess_mode="livesum",
)
ENCODER_BATCH = bentoml.metrics.Histogram(
    name="clipheads_encoder_batch_size", documentation="Images per encoder pass (continuous batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ENCODER_QUEUE = bentoml.metrics.Gauge(
    name="clipheads_encoder_queue_images", documentation="Images waiting for an encoder pass",
    multiprocess_mode="livesum",
)
LABEL_SETS = bentoml.metrics.Counter(
    name="clipheads_label_sets_total", documentation="Label embeddings asked for (zero-shot, few-shot), by where "
    "they came from: the front's cache or an encoder call", labelnames=["source"],
)
HEAD_INFO = bentoml.metrics.Gauge(
    name="clipheads_head_info", documentation="1 for the head version being served", labelnames=["version"],
    multiprocess_mode="livemax",
)
HEAD_LOAD_FAILURES = bentoml.metrics.Counter(
    name="clipheads_head_load_failures_total", documentation="Refused head reloads by reason",
    labelnames=["reason"],
)
RUNTIME_ERRORS = bentoml.metrics.Counter(
    name="clipheads_runtime_errors_total", documentation="Unexpected runtime failures", labelnames=["runtime"],
)
