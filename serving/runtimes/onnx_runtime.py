"""ONNX Runtime over an export bundle's graphs (CPU or CUDA execution provider)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from clipheads.training.files import file_sha256
from clipheads.training.text_length import LENGTH_BUCKET, trim_tokens

from .base import Runtime, RuntimeError_
from .bundle import backbone_identity, index_tasks, read_manifest, zero_shot_path
from .split_pass import MIN_BATCH, SplitPass, passes_wanted, split_wanted, usable_cores

log = logging.getLogger("clipheads.serving")


def warn_int8_sums(manifest: dict) -> bool:
    """Warn (and say so) when a static int8 bundle was gated on a CPU whose int8 GEMM sums exactly
    and this one's may saturate (export/cpu_features.py): its answers can differ from the gate's."""
    from clipheads.export.cpu_features import exact_int8_sums, int8_features

    static = any(isinstance(r, dict) and r.get("mode") == "static" for r in (manifest.get("int8") or {}).values())
    here = int8_features()
    if not static or not here or exact_int8_sums(here):
        return False
    there = manifest.get("int8_exported_on") or {}
    log.warning("this static int8 bundle was gated on %s; this CPU (%s) has no VNNI/AMX, where ONNX Runtime's "
                "int8 GEMM can saturate: answers may differ from the gate's (re-export as fp32, or gate it here)",
                there.get("cpu") or "an unrecorded CPU", here.get("cpu") or "unknown")
    return True

# A CPU image graph whose batch-1 pass takes less than this runs on one intra-op thread: its ops are
# too small to split, and waking a second thread per op costs more than it saves (the packaged tiny
# CLIP on 2 cores: 1.31 -> 0.79 CPU ms per image at batch 1, 0.73 -> 0.61 at batch 32, and no
# slower in wall time at any batch). ViT-B graphs take tens of ms and keep ORT's default.
SMALL_GRAPH_MS = 3.0


class OnnxRuntime(Runtime):
    def __init__(self, bundle: str | os.PathLike, providers: Optional[Sequence[str]] = None, verify: bool = True,
                 image_sessions: bool = True, split_passes: Optional[bool] = None):
        """`split_passes`: run CPU image batches of >= 2 as two 1-thread half passes at once
        (split_pass.py); None: `CLIPHEADS_ORT_SPLIT` and the core count decide."""
        super().__init__()
        import onnxruntime as ort

        root = Path(bundle)
        m = read_manifest(root)
        self.manifest = m
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.name = "onnx-cuda" if providers and providers[0] == "CUDAExecutionProvider" else "onnx-cpu"
        pre = dict(m["preprocess"])
        self.preprocess = pre
        self._float_input = pre.get("input_dtype", "uint8") == "float32"
        self._mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
        bb = m.get("backbone") or {}
        self.identity = backbone_identity(bb)
        self.logit_scale = float(m.get("logit_scale", 100.0))
        threads = int(os.environ.get("CLIPHEADS_ORT_THREADS", "0"))
        spin = os.environ.get("CLIPHEADS_ORT_SPIN", "")

        def options(intra_op: int) -> "ort.SessionOptions":
            opts = ort.SessionOptions()
            if intra_op:
                opts.intra_op_num_threads = intra_op
            if spin in ("0", "1"):  # "0": idle intra-op threads sleep instead of spinning (shared cores)
                opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
            return opts

        self.intra_op_threads = threads or None  # of the image graphs; None: ORT's default (one per core)
        self._sessions: dict[str, "ort.InferenceSession"] = {}

        opts = options(threads)

        def session(fname: str):
            if fname not in self._sessions:
                path = root / fname
                if not path.is_file():
                    raise RuntimeError_(f"{root}: graph {fname} listed in the manifest is missing")
                want = (m["graphs"].get(fname) or {}).get("sha256")
                if verify and want and file_sha256(path) != want:
                    raise RuntimeError_(f"{root}: {fname} does not match its sha256 in the manifest")
                self._sessions[fname] = ort.InferenceSession(str(path), opts, providers=list(providers))
            return self._sessions[fname]

        self._path_keys, self.tasks = index_tasks(m["tasks"])
        if self.name == "onnx-cpu":
            warn_int8_sums(m)
        self.paths = [f"{g}#{k}" for g, k in self._path_keys]
        if image_sessions:  # False: a subclass runs the image graphs (TensorRT engines)
            for g in dict.fromkeys(g for g, _ in self._path_keys):
                session(g)
            if not threads and self.name == "onnx-cpu" and (os.cpu_count() or 1) > 1 and _small_graph(
                    self._sessions[self._path_keys[0][0]], int(pre["image_size"])):
                self.intra_op_threads = 1
                single = options(1)
                for g in list(self._sessions):  # already checked against the manifest: no second hash
                    self._sessions[g] = ort.InferenceSession(str(root / g), single, providers=list(providers))
        # 1-thread sessions of the image graphs, for the two opt-ins that run two passes at once
        # (split_pass.py explains why): halves of one batch (CLIPHEADS_ORT_SPLIT=1), and passes of
        # the encoder's two runners, one beside the other (CLIPHEADS_ORT_PASSES=2)
        cpu_images = image_sessions and self.name == "onnx-cpu"
        cores = usable_cores()
        split = cpu_images and (split_passes if split_passes is not None else split_wanted(
            os.environ.get("CLIPHEADS_ORT_SPLIT", "0"), self.intra_op_threads, cores))
        self.concurrent_passes = passes_wanted(os.environ.get("CLIPHEADS_ORT_PASSES", "1"), self.intra_op_threads,
                                               cores) if cpu_images else 1
        self._single: dict[str, "ort.InferenceSession"] = {}
        if split or self.concurrent_passes > 1:
            single = options(1)
            self._single = {g: ort.InferenceSession(str(root / g), single, providers=list(providers))
                            for g in self._sessions}
        self._split: Optional[SplitPass] = SplitPass(self._single) if split else None
        self._inputs = {f: {i.name for i in s.get_inputs()} for f, s in self._sessions.items()}
        text = m.get("text") or {}
        self._text = session(text["graph"]) if text.get("graph") else None
        self.has_text = self._text is not None
        self._ctx_len = int(text.get("context_length", 77))
        # a "dynamic" text graph takes each call cut to its longest label (BUNDLE.md, Text length)
        pool = text.get("pool") or {}
        self._text_cut = ((pool.get("type", "argmax"), pool.get("eos_id"), int(text.get("length_bucket", LENGTH_BUCKET)))
                          if text.get("sequence") == "dynamic" else None)
        self._tokenizer = None
        self._tokenizer_name = text.get("tokenizer") or bb.get("arch")
        self.base_path = zero_shot_path(self._path_keys, text.get("image_graph"))

    def describe(self) -> dict:
        return {**super().describe(), "intra_op_threads": self.intra_op_threads, "split_passes": self._split is not None,
                "concurrent_passes": self.concurrent_passes}

    def _feed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if not self._float_input:
            return np.ascontiguousarray(pixels, dtype=np.uint8)
        return ((pixels.astype(np.float32) / 255.0 - self._mean) / self._std).astype(np.float32)

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False) -> tuple[np.ndarray, np.ndarray]:
        fname, k = self._path_keys[path]
        sess = self._single[fname] if alongside and self.concurrent_passes > 1 else self._sessions[fname]
        feed = {"pixels": self._feed_pixels(pixels)}
        if "task_index" in self._inputs[fname]:
            feed["task_index"] = np.full((len(pixels),), k, np.int64)
        if self._split is not None and len(pixels) >= MIN_BATCH:
            logits, feats = self._split.run(fname, ["logits", "features"], feed)
        else:
            logits, feats = sess.run(["logits", "features"], feed)
        return logits.astype(np.float32, copy=False), feats.astype(np.float32, copy=False)

    def _tokenize(self, texts: Sequence[str]) -> np.ndarray:
        if self._tokenizer is None:
            import open_clip

            from clipheads.training.backbone import register_packaged_configs

            register_packaged_configs()
            self._tokenizer = open_clip.get_tokenizer(self._tokenizer_name, context_length=self._ctx_len)
        return self._tokenizer(list(texts)).numpy().astype(np.int64)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._text is None:
            raise RuntimeError_("this bundle has no text graph; request-time labels are unavailable")
        tokens = self._tokenize(texts)
        if self._text_cut is not None:
            pool_type, eos_id, bucket = self._text_cut
            tokens = trim_tokens(tokens, pool_type, eos_id, bucket=bucket)
        (feats,) = self._text.run(["features"], {"tokens": np.ascontiguousarray(tokens)})
        return feats.astype(np.float32, copy=False)


def _small_graph(sess, image_size: int) -> bool:
    """True when a warm batch-1 pass of this image graph takes under SMALL_GRAPH_MS (any of three,
    so one descheduled pass on a busy machine does not decide it; a pass 10x over stops the probe)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    feed = {"pixels": np.full((1, 3, image_size, image_size), 127,
                              np.float32 if types.get("pixels") == "tensor(float)" else np.uint8)}
    if "task_index" in types:
        feed["task_index"] = np.zeros((1,), np.int64)
    try:
        sess.run(None, feed)  # the first pass allocates
    except Exception:  # noqa: BLE001 - only a speed choice: warm-up reports a graph that cannot run
        return False
    for _ in range(3):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ms = (time.perf_counter() - t0) * 1000
        if ms < SMALL_GRAPH_MS:
            return True
        if ms > 10 * SMALL_GRAPH_MS:
            return False
    return False
