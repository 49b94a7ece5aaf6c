"""`Front`: the state and plumbing of the HTTP front process, under the endpoints (routes.py).

Readiness (warm-up through the encoder, a cheap ping per probe, re-warm after an encoder restart),
the drain flag, the one client session to the encoder, decoding in a thread pool, the answer
wrapper that turns every exception into our error body, and the label-embedding cache.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from typing import Any, Callable, Optional

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from ..drain import chain_exit_signals
from ..hop import EncoderUnavailable, HopClient
from ..images import DecodeSpec, ImageRejected
from ..metrics import IMAGES, LABEL_SETS, REJECTIONS, REQUESTS, RUNTIME_ERRORS
from ..tasks import LRUCache, TaskStore, TaskStoreError, open_task_store
from ..wire import unpack_array
from .config import ServeConfig
from .decode_budget import DecodeBudget, DecodeLanes
from .errors import ApiError, EncoderFailure
from .store_calls import StoreCalls

log = logging.getLogger("clipheads.serving")

# Set by `Front.answer` for one request: whether its encode call has come back (see `Front.coming`).
_PAST_ENCODER: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("clipheads_past_encoder", default=None)


class Front:
    """Base of the front service class. `self.enc` is the encoder client (set by the service)."""

    enc: Any

    def __init__(self, config: ServeConfig) -> None:
        self.cfg = config
        # one image at the per-image cap must always fit the process budget
        self.lanes = DecodeLanes(DecodeBudget(config.max_request_pixels, max(config.max_decode_pixels, config.max_pixels),
                                              config.large_image_pixels, config.inline_decode_pixels),
                                 small_threads=config.decode_threads)
        self.text_cache = LRUCache(256)
        self.ready = False
        self.info: Optional[dict] = None
        self.spec: Optional[DecodeSpec] = None
        self.store: Optional[TaskStore] = None
        self.store_calls = StoreCalls(config.tasks_store_timeout_s)
        self.failures = 0
        self.draining = False
        self.encoder_pid: Optional[int] = None
        self.head_version: str = ""  # the version of the last result from the encoder
        self.hop = HopClient()  # the encode calls' path to the encoder (hop.py), once the encoder names it
        self.admitted: Callable[[], int] = lambda: 0  # requests the guard admitted, until answered (service.py)
        self._past_encoder = 0  # admitted requests whose encode call has come back
        self._warm_lock = asyncio.Lock()
        self._warm_task: Optional[asyncio.Future] = None
        if self.cfg.allow_reload and not self.cfg.auth_token:
            log.warning("CLIPHEADS_ALLOW_RELOAD ignored: admin routes need CLIPHEADS_AUTH_TOKEN")

    # ---- readiness ---------------------------------------------------------------------------
    async def _warm(self) -> bool:
        async with self._warm_lock:
            try:
                if self.info is None:
                    info = await asyncio.wait_for(self.enc.to_async.info(), 30.0)
                    if info.get("error"):
                        raise RuntimeError(info["error"])
                    self.spec = DecodeSpec.from_preprocess(
                        info["preprocess"], max_bytes=self.cfg.max_body_bytes, max_pixels=self.cfg.max_pixels
                    )
                    self.store = await self.store_calls.open(
                        functools.partial(open_task_store, self.cfg.tasks_store, identity=info["identity"]))
                    log.info("few-shot tasks: %s", self.store.describe())
                    self.info = info
                    self.head_version = info.get("version", "")
                ping = await asyncio.wait_for(self.enc.to_async.ping(front_pid=os.getpid()), 2.0)
                if ping.get("error"):
                    raise RuntimeError(ping["error"])
                self.hop.point_to(ping.get("hop") or "")  # "" (in-process encoder): BentoML's call
                s = int(self.info["image_size"])
                px = np.full((1, 3, s, s), 127, np.uint8)
                await self.encode(px, list(range(len(self.info["paths"]))), count=False)
                if self.info.get("has_text", True):
                    await self.enc.to_async.encode_texts(["a photo of a thing."])
                self.encoder_pid = ping["pid"]
                self.ready, self.failures = True, 0
            except Exception as err:  # noqa: BLE001
                log.warning("not ready: %s: %s", type(err).__name__, err)
                self.ready = False
        return self.ready

    def _start_warm(self) -> None:
        if self._warm_task is None or self._warm_task.done():
            self._warm_task = asyncio.ensure_future(self._warm())

    async def __is_ready__(self) -> bool:
        """200 only when warmed up, not draining, and the encoder process answers a cheap async
        ping (not queued behind model passes) within 1 s. A dead or restarted encoder (new pid)
        turns this 503 at once and starts a background re-warm; probes never wait for it."""
        if self.draining:
            return False
        if self.ready and self.failures < 3:
            try:
                ping = await asyncio.wait_for(self.call_encoder("ping"), 1.0)
            except Exception as err:  # noqa: BLE001 - dead/restarting encoder, socket gone, timeout
                log.warning("encoder not answering: %s: %s", type(err).__name__, err)
                ping = None
            if ping is not None and ping.get("pid") == self.encoder_pid and not ping.get("error"):
                return True
            self.ready = False
        self._start_warm()
        return False

    def encoder_lost(self) -> None:
        """The encoder went away under a request: not ready until a re-warm reaches the new one."""
        self.ready = False
        if not self.draining:
            self._start_warm()

    @bentoml.on_startup
    def _install_drain_handler(self) -> None:
        """SIGTERM/SIGINT: flip /readyz to 503 at once, then let uvicorn drain in-flight requests."""

        def on_signal(signum, prev):
            self.draining = True
            prev(signum, None)

        chain_exit_signals(on_signal)

    # ---- answers -----------------------------------------------------------------------------
    def error(self, ctx: bentoml.Context, endpoint: str, err: ApiError) -> dict:
        ctx.response.status_code = err.status
        ctx.response.headers["x-clipheads"] = "1"
        if err.status in (429, 503):
            ctx.response.headers["retry-after"] = "1"
        REJECTIONS.labels(kind=err.kind).inc()
        REQUESTS.labels(endpoint=endpoint, status=str(err.status)).inc()
        return {"error": err.kind, "detail": err.detail}

    async def answer(self, ctx: bentoml.Context, endpoint: str, fn) -> dict:
        """Run an endpoint body: its result, or our error body for whatever it raised."""
        if not self.ready:  # never wait for a (re)load inside a request: fast 503, warm behind it
            self._start_warm()
            return self.error(ctx, endpoint, ApiError(503, "not_ready", "the model is not loaded yet; retry shortly"))
        if not self.cfg.batch_wait_ms:  # nothing waits on `coming`: no bookkeeping per request
            return await self._answer(ctx, endpoint, fn)
        past = _PAST_ENCODER.set([])
        try:
            return await self._answer(ctx, endpoint, fn)
        finally:
            if _PAST_ENCODER.get():
                self._past_encoder -= 1
            _PAST_ENCODER.reset(past)

    def coming(self) -> int:
        """The front's other admitted requests that have not reached the encoder yet: what the
        encoder's batcher may wait for (encoder/batching.py). Requests that never encode (task
        lists, refused images) count too while in flight: a wait they cause ends at `wait_ms`."""
        if not self.cfg.batch_wait_ms:
            return 0
        return max(0, self.admitted() - self.hop.in_flight - self._past_encoder - 1)

    async def _answer(self, ctx: bentoml.Context, endpoint: str, fn) -> dict:
        try:
            out = await fn()
        except ApiError as err:
            return self.error(ctx, endpoint, err)
        except ImageRejected as err:
            return self.error(ctx, endpoint, ApiError(err.http_status, err.kind, err.detail))
        except TaskStoreError as err:
            return self.error(ctx, endpoint, ApiError(err.http_status, err.kind, err.detail))
        except EncoderUnavailable as err:  # dead, restarting or stopped encoder: retryable, never a 500
            log.warning("%s: encoder unavailable: %s", endpoint, err)
            self.encoder_lost()
            return self.error(ctx, endpoint, ApiError(503, "not_ready", "the model is restarting; retry shortly"))
        except Exception as err:  # noqa: BLE001 - a runtime failure: generic body, no internals
            if isinstance(err, ServiceUnavailable) or "overloaded" in str(err).lower():
                return self.error(ctx, endpoint, ApiError(503, "overloaded", "encoder queue is full; retry shortly"))
            log.exception("internal error in %s", endpoint)
            RUNTIME_ERRORS.labels(runtime=(self.info or {}).get("runtime", "?")).inc()
            if isinstance(err, EncoderFailure):  # only the runtime's own failures speak to readiness:
                self.failures += 1  # anything a request's content can cause must not flip /readyz
            return self.error(ctx, endpoint, ApiError(500, "internal", "unexpected server error; see the server log"))
        ctx.response.headers["x-clipheads"] = "1"
        REQUESTS.labels(endpoint=endpoint, status=str(ctx.response.status_code or 200)).inc()
        self.failures = 0
        return out

    # ---- images ------------------------------------------------------------------------------
    async def decode(self, blobs: list[bytes]) -> np.ndarray:
        """Headers first (caps, per-request and process decode budgets: decode_budget.py), then
        decoding, small and large images in separate lanes."""
        headers = self.lanes.probe(blobs, self.spec)
        with self.lanes.admit(headers):
            results = await asyncio.gather(*(self.lanes.decode(b, h, self.spec) for b, h in zip(blobs, headers)))
        for i, r in enumerate(results):
            if isinstance(r, ImageRejected):
                raise ImageRejected(r.kind, f"image {i}: {r.detail}", r.http_status)
        return np.stack(results)

    # ---- the encoder -------------------------------------------------------------------------
    async def call_encoder(self, method: str, *args, **kw):
        """Encoder calls are idempotent (a repeated reload loads the same file again): retry when
        the connection to the encoder's socket was closed under us (aiohttp ServerDisconnected, e.g.
        a pooled connection the encoder closed as idle). Rare since the session is never renewed
        (`runner_connection`); a retried `encode` costs the encoder a second pass."""
        import aiohttp

        for attempt in range(3):
            try:
                return await getattr(self.enc.to_async, method)(*args, **kw)
            except aiohttp.ClientConnectionError as err:
                if attempt == 2:
                    raise EncoderUnavailable(f"{method}: {type(err).__name__}: {err}") from err
                log.info("encoder connection dropped; retrying %s", method)
                await asyncio.sleep(0.01 * (attempt + 1))

    async def encode(self, pixels: np.ndarray, paths: list[int], count: bool = True) -> tuple[dict, str]:
        """One encoder call per request: one job per image (uint8), each naming every path it
        needs, so an image is sent once and encoded once per distinct path. Returns
        ({path: {"logits", "features"}}, head version): a request runs in one pass, one version."""
        deadline = time.time() + self.cfg.timeout_s
        if self.hop.path:  # raw frames on the encoder's own socket (hop.py)
            version, errors, out = await self.hop.encode(pixels, paths, deadline, timeout=self.cfg.encoder_timeout_s,
                                                         coming=self.coming())
            past = _PAST_ENCODER.get()
            if past is not None and not past:  # once per request (zero-shot may encode twice)
                past.append(True)
                self._past_encoder += 1
        else:  # an in-process encoder (tests): BentoML's call
            version, errors, out = _from_jobs(await self.call_encoder(
                "encode", [{"paths": paths, "pixels": px} for px in pixels], deadline=deadline), paths, len(pixels))
        if errors:
            if "timeout" in errors:
                raise ApiError(504, "timeout", f"not processed within {self.cfg.timeout_s} s")
            raise EncoderFailure("the encoder failed on this request")
        self.head_version = version
        if count:
            IMAGES.labels(runtime=self.info["runtime"]).inc(len(pixels))
        return out, version

    async def text_weights(self, labels: list[str], templates: tuple[str, ...], version: str) -> tuple[np.ndarray, str]:
        """(L, E) label embeddings and the head version that computed them (the text tower carries
        a head's learned context): from the cache when `version` computed them before."""
        if not self.info.get("has_text", True):
            raise ApiError(422, "text_unavailable", "this bundle has no text graph: request-time labels and "
                           "few-shot tasks are unavailable; classify with the bundle's tasks")

        cached = self.text_cache.get((version, tuple(labels), templates))
        if cached is not None:
            LABEL_SETS.labels(source="cache").inc()
            return cached, version
        LABEL_SETS.labels(source="encoder").inc()
        texts = [t.format(lab.replace("_", " ")) for lab in labels for t in templates]
        res = await self.call_encoder("encode_texts", texts)
        f = unpack_array(res["weights"]).reshape(len(labels), len(templates), -1).mean(axis=1)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        self.text_cache.put((res["version"], tuple(labels), templates), f)
        return f, res["version"]

    async def features_and_text(self, pixels: np.ndarray, labels: list[str], templates: tuple[str, ...]):
        """Base-path image features and label embeddings from ONE head version: recomputed in the
        rare case a swap landed between the two calls."""
        base = self.info["base_path"]
        for _ in range(3):
            enc, version = await self.encode(pixels, [base])
            text, text_version = await self.text_weights(labels, templates, version)
            if text_version == version:
                return enc[base]["features"], text, version
        raise ApiError(503, "head_swapping", "the head was swapped repeatedly during this request; retry")

    # ---- few-shot tasks ----------------------------------------------------------------------
    async def stored(self, fn: Callable, *args, **kw):
        """`fn(*args, **kw)`, a call on the task store, off the event loop and bounded in time
        (store_calls.py): a stalled database is a 503 for that request, never a frozen front."""
        return await self.store_calls.run(fn, *args, store=self.store, **kw)

    def all_tasks(self) -> dict[str, dict]:
        return {t["name"]: t for t in self.info["tasks"]}



def _from_jobs(res: list[dict], paths: list[int], n: int) -> tuple[str, Optional[list], dict]:
    """BentoML's `encode` answer (one dict per image) in the hop's shape: (version, errors, outputs)."""
    versions = {r.get("version", "") for r in res}
    if len(res) != n or len(versions) != 1 or any("error" in r for r in res):
        return "", [r.get("error", "internal") for r in res] or ["internal"], {}
    return versions.pop(), None, {p: {"logits": np.stack([r["logits"][p] for r in res]),
                                      "features": np.stack([r["features"][p] for r in res])} for p in paths}
