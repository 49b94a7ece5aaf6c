"""The BentoML services: a light front (`ClipHeads`) and the encoder (`Encoder`) that holds the Runtime.

    client --HTTP--> GuardMiddleware (front/guard.py) --> ClipHeads (front/: decode, validate,
                                         route tasks, few-shot, zero-shot label cache, answers)
                                           | bentoml.depends (local unix socket)
                                           v
                                         Encoder (encoder/: head slot + continuous batching
                                                  over a Runtime from runtimes/)

Start it with `clipheads serve BUNDLE|HEAD` (serving/cli.py) or
`CLIPHEADS_SOURCE=... bentoml serve clipheads.serving.service:ClipHeads`. Everything is configured
from environment variables (front/config.py `ServeConfig`), read once at import because BentoML's
service decorators take their limits at class-definition time. This module only binds the pieces
to BentoML: the endpoints' bodies are front/routes.py, the encoder's logic encoder/.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Optional

import bentoml
from pydantic import StrictBool, StrictInt

from .bento_speed import install_outermost, pin_output_media_types
from .drain import FrontRegistry, chain_exit_signals, pin_dependency
from .encoder.core import EncoderCore
from .front import routes
from .front.config import CONFIG, ServeConfig
from .front.core import Front
from .front.fast import FastEntrance, Lane
from .front.guard import GuardMiddleware
from .front.http_layer import install_json_400
from .hop import HopServer
from .metrics import install_bounded_labels
from .process_manager import install_private_endpoints
from .startup import startup_problem
from .wire import RefusePickle, pack_array

log = logging.getLogger("clipheads.serving")

install_bounded_labels()  # BentoML's request metrics: one series per route, not per client-sent path
install_json_400()  # uvicorn's own 400 for unparseable HTTP in our error shape (front/http_layer.py)
install_private_endpoints()  # circus' control endpoints on unix sockets in a 0700 dir, not TCP ports

LANE = Lane(CONFIG.fast_classify)  # POST /classify's fast path: front/fast.py

__all__ = ["ClipHeads", "Encoder", "CONFIG", "ServeConfig", "GuardMiddleware"]


# ---- the encoder service ----------------------------------------------------------------------
@bentoml.service(
    name="clipheads_encoder",
    workers=1,
    threads=1,  # the runtime itself uses the cores (ORT intra-op / torch threads)
    traffic={"timeout": CONFIG.encoder_timeout_s},
    # BentoML renews its client session to a dependency every 100 requests by closing the old one,
    # which cuts the requests still in flight on it (aiohttp ServerDisconnected). A local socket
    # needs no renewal: one session for the life of the front.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class Encoder:
    """Holds the Runtime (encoder/core.py). Internal only: reached from ClipHeads over a local unix socket."""

    def __init__(self) -> None:
        self.core = EncoderCore(CONFIG.source, CONFIG.runtime, CONFIG.backbone_weights, CONFIG.max_batch_size,
                                CONFIG.batch_wait_ms)
        self.fronts = FrontRegistry(CONFIG.grace_s)
        # the front's encode calls (hop.py); BentoML's own route below stays for in-process use
        self.hop = HopServer(self.core.batcher, max_images=max(CONFIG.max_images, CONFIG.max_examples))

    @bentoml.api
    async def encode(self, jobs: list[Any], deadline: float = 0.0) -> list[Any]:
        """jobs: one per image of ONE request, {"paths": [int], "pixels": (3, S, S) uint8} ->
        per image {"logits": {path: (C_path,)}, "features": {path: (E,)}} or {"error": kind}
        (encoder/batching.py). `deadline` (epoch seconds, 0 = none): the front has given up after it."""
        return await self.core.batcher.submit(jobs, deadline)

    @bentoml.api
    async def ping(self, front_pid: int = 0) -> dict:
        """Cheap liveness of this process for the front's /readyz (pid changes on a restart).
        A front pings with its pid once warm: on SIGTERM this encoder outlives those fronts."""
        self.fronts.register(int(front_pid))
        return {"pid": os.getpid(), "error": self.core.error, "hop": self.hop.path}

    @bentoml.on_startup
    def _defer_exit_to_fronts(self) -> None:
        chain_exit_signals(self.fronts.on_exit_signal)

    @bentoml.on_startup
    def _start_hop(self) -> None:
        self.hop.start()

    @bentoml.on_shutdown
    def _stop_runner(self) -> None:
        self.hop.close()
        self.core.close()

    @bentoml.api
    def encode_texts(self, texts: list[str]) -> dict:
        """{"weights": (N, E) float32 as wire.pack_array, "version"}: JSON, as every call here is."""
        res = self.core.encode_texts(texts)
        return {"weights": pack_array(res["weights"]), "version": res["version"]}

    @bentoml.api
    def info(self) -> dict:
        return self.core.info(self.hop.path)

    @bentoml.api
    async def reload(self, source: str) -> dict:
        """Load, warm up and check `source` beside the serving head, then swap (encoder/heads.py).
        The serving head keeps answering meanwhile and stays if anything fails."""
        return await asyncio.get_running_loop().run_in_executor(None, self.core.reload, source)

    @bentoml.api
    def check(self) -> dict:
        """Re-run the warm-up pass (readiness probe of the runtime)."""
        return self.core.check()

    def __is_ready__(self) -> bool:
        return self.core.error is None


# ---- the front service ------------------------------------------------------------------------
@bentoml.service(
    name="clipheads",
    workers=CONFIG.front_workers,  # front processes on one port, one encoder (front/config.py)
    http={"host": os.environ.get("CLIPHEADS_HOST", "127.0.0.1")},
    # BentoML's own limits are backstops; GuardMiddleware answers first with JSON bodies.
    traffic={"timeout": CONFIG.backstop_timeout_s, "max_concurrency": CONFIG.backstop_concurrency},
)
class ClipHeads(Front):
    encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        super().__init__(CONFIG)
        # the encoder client, through a link to its socket that outlives BentoML's shutdown (drain.py)
        self.enc, self._enc_link = pin_dependency(self, "encoder", Encoder)
        self.admitted = lambda: LANE.guard.in_flight if LANE.guard is not None else 0
        LANE.bind(self)

    @bentoml.on_deployment
    def _refuse_a_server_that_cannot_serve() -> None:
        """Runs once in `bentoml serve`'s own process before any worker starts (never at build):
        no or an unknown source, or a task store that is a file, stops the server (exit 1, one
        line) instead of an encoder that restarts forever or a front that is never ready."""
        problem = startup_problem(CONFIG.source, CONFIG.tasks_store, CONFIG.front_workers, CONFIG.runtime)
        if problem:
            raise SystemExit(f"clipheads: {problem}")

    @bentoml.on_startup
    async def _open_encoder_client(self) -> None:
        if self._enc_link is not None:  # our own client: set up its endpoints as BentoML does for its own
            await self.enc.__aenter__()

    @bentoml.on_shutdown
    async def _close_encoder_client(self) -> None:
        await self.hop.close()
        if self._enc_link is not None:
            await self.enc.close()
            self._enc_link.remove()

    @bentoml.on_shutdown
    def _close_task_store(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store_calls.close()

    # ---- endpoints (bodies in front/routes.py) -----------------------------------------------
    @bentoml.api(route="/classify")
    async def classify(
        self,
        ctx: bentoml.Context,
        images: list[Path] = [],  # noqa: B006 - BentoML builds the schema from defaults
        images_b64: list[str] = [],  # noqa: B006
        tasks: Optional[list[str]] = None,
        top_k: StrictInt = 5,  # strict: `true` is not 1
    ) -> dict:
        """Classify images with the bundle's tasks and registered few-shot tasks.
        multipart: `images` files, `tasks` JSON list (default: all bundle tasks), `top_k`;
        JSON: {"images_b64": [...], "tasks": [...], "top_k": 5}."""
        return await self.answer(ctx, "classify", lambda: routes.classify(self, images, images_b64, tasks, top_k))

    @bentoml.api(route="/zero_shot")
    async def zero_shot(
        self,
        ctx: bentoml.Context,
        labels: list[str],
        images: list[Path] = [],  # noqa: B006
        images_b64: list[str] = [],  # noqa: B006
        templates: Optional[list[str]] = None,
        top_k: StrictInt = 5,
    ) -> dict:
        """Rank free-text `labels` (JSON list) for each image; `templates` like "a photo of a {}."."""
        return await self.answer(ctx, "zero_shot",
                                 lambda: routes.zero_shot(self, labels, images, images_b64, templates, top_k))

    @bentoml.api(route="/tasks")
    async def register_task(
        self,
        ctx: bentoml.Context,
        name: str,
        labels: list[str],
        example_labels: list[str],
        images: list[Path] = [],  # noqa: B006
        images_b64: list[str] = [],  # noqa: B006
        templates: Optional[list[str]] = None,
        replace: StrictBool = False,  # strict: "yes" is not true
    ) -> dict:
        """Register a training-free few-shot task: `labels`, example `images` and, per image, its
        label in `example_labels`. Persisted to CLIPHEADS_TASKS_DIR."""
        return await self.answer(ctx, "register_task", lambda: routes.register_task(
            self, ctx, name, labels, example_labels, images, images_b64, templates, replace))

    @bentoml.api(route="/tasks/list")
    async def list_tasks(self, ctx: bentoml.Context) -> dict:
        """All tasks: the bundle's and the registered few-shot ones (also GET /tasks)."""
        return await self.answer(ctx, "list_tasks", lambda: routes.list_tasks(self))

    @bentoml.api(route="/tasks/delete")
    async def delete_task(self, ctx: bentoml.Context, name: str) -> dict:
        """Remove a registered few-shot task (also DELETE /tasks/{name})."""
        return await self.answer(ctx, "delete_task", lambda: routes.delete_task(self, name))

    @bentoml.api(route="/admin/reload")
    async def reload_head(self, ctx: bentoml.Context, source: str) -> dict:
        """Swap the served head for `source` (a model-store tag, or a path inside the reload root)
        without dropping requests: loaded and warmed up beside the serving head, which stays on any
        failure. 404 unless the server runs with --allow-reload (and a token)."""
        return await self.answer(ctx, "reload", lambda: routes.reload_head(self, source))


Encoder.add_asgi_middleware(RefusePickle)  # JSON only from the front (wire.py)
ClipHeads.add_asgi_middleware(GuardMiddleware, config=CONFIG, lane=LANE)
install_outermost("clipheads", FastEntrance, lane=LANE)  # before BentoML's own middlewares
pin_output_media_types(ClipHeads)  # the encoder answers in the request's JSON: left alone
