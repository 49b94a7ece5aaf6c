"""`EncoderCore`: what the encoder is, apart from how it is reached.

The head slot, the continuous batcher and the readiness of the runtime, with the calls the front
makes (info, encode_texts, reload, check). The `Encoder` BentoML service (service.py) binds it to
BentoML and to the hop (hop.py): how the fronts reach it is not this module's business. (A front
holding a core in its own process was measured and not kept: bench/serving/results/README.md.)
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Optional

from ..metrics import HEAD_INFO, HEAD_LOAD_FAILURES
from ..runtimes import Runtime
from .batching import ContinuousBatcher
from .heads import HeadIncompatible, HeadLoadError, HeadSlot, load_head

log = logging.getLogger("clipheads.serving")


def runtime_hook() -> Optional[Callable[[Runtime], Runtime]]:
    """CLIPHEADS_RUNTIME_HOOK="module:callable" (diagnostics / fault-injection tests only):
    wraps every runtime the encoder loads."""
    hook = os.environ.get("CLIPHEADS_RUNTIME_HOOK", "")
    if not hook:
        return None
    mod, _, fn = hook.partition(":")
    log.warning("runtime wrapped by CLIPHEADS_RUNTIME_HOOK=%s", hook)
    return getattr(importlib.import_module(mod), fn)


class EncoderCore:
    """Loads `source` (a bundle, a head file or a model-store tag) on `runtime`, warms it up (a
    failure is reported through `error`, not raised: a crash loop would never answer readiness) and
    batches encode calls over it (encoder/batching.py: `max_batch` images a pass, `wait_ms`)."""

    def __init__(self, source: str, runtime: str = "auto", backbone_weights: str = "", max_batch: int = 64,
                 wait_ms: int = 0) -> None:
        from ..model_store import resolve_source

        if not source:
            raise RuntimeError("set CLIPHEADS_SOURCE to a bundle directory, a *.head.safetensors file or a model tag")
        # The front (HTTP, decode) shares the cores with ORT: idle intra-op threads must sleep, not
        # spin (ViT-B/32 on 2 busy cores: 207 -> 115 CPU ms per image at concurrency 1).
        os.environ.setdefault("CLIPHEADS_ORT_SPIN", "0")
        self.runtime_kind = runtime
        self.wrap = runtime_hook()
        weights = backbone_weights or None
        self.slot = HeadSlot(load_head(resolve_source(source), runtime, self.wrap, warm=False, weights=weights),
                             weights)
        HEAD_INFO.labels(version=self.slot.current.version).set(1)
        self.error: Optional[str] = None
        self.batcher = ContinuousBatcher(self.slot, max_batch, wait_ms)
        self.check()
        log.info("encoder ready: %s on %s (head version %s)", self.runtime.name, source, self.slot.current.version)

    @property
    def runtime(self) -> Runtime:
        return self.slot.current.runtime

    def info(self, hop: str) -> dict:
        """What the front plans requests with; `hop` names how it reaches encode."""
        head = self.slot.current
        rt = head.runtime
        d = rt.describe()
        d.update(preprocess=rt.preprocess, base_path=rt.base_path, logit_scale=rt.logit_scale, error=self.error,
                 slices={t.name: list(t.logit_slice) for t in rt.tasks.values()}, version=head.version, hop=hop)
        return d

    def encode_texts(self, texts: list[str]) -> dict:
        head = self.slot.current
        return {"weights": head.runtime.encode_texts(texts), "version": head.version}

    def reload(self, source: str) -> dict:
        """Load, warm up and check `source` beside the serving head, then swap (encoder/heads.py).
        The serving head keeps answering meanwhile and stays if anything fails. Blocking."""
        try:
            old, new = self.slot.swap(source, self.runtime_kind, self.wrap)
        except (HeadLoadError, HeadIncompatible) as err:
            reason = "incompatible_head" if isinstance(err, HeadIncompatible) else "head_load_failed"
            HEAD_LOAD_FAILURES.labels(reason=reason).inc()
            log.warning("reload of %s refused: %s", source, err)
            return {"error": reason, "detail": str(err)[:1000]}
        HEAD_INFO.labels(version=old.version).set(0)
        HEAD_INFO.labels(version=new.version).set(1)
        self.error = None
        return {"version": new.version, "previous": old.version}

    def check(self) -> dict:
        """(Re-)run the warm-up pass: the readiness of the runtime."""
        try:
            self.runtime.warmup()
            self.error = None
        except Exception as err:  # noqa: BLE001 - reported through readiness, not a crash loop
            self.error = f"{type(err).__name__}: {err}"
            log.exception("runtime warm-up failed")
        return {"ok": self.error is None, "error": self.error}

    def close(self) -> None:
        self.batcher.close()
