"""Runtimes: one interface over TensorRT / ONNX Runtime (CUDA, CPU) / eager PyTorch.

The service and batch scoring only see `Runtime`:

* `paths`               distinct image paths (graph, task_index). Tasks whose image path is the
                        same share one encoder pass; `TaskInfo.path` + `logit_slice` say where a
                        task's logits live in that pass's output.
* `run_path(p, pixels)` (N, 3, S, S) uint8 -> logits (N, C_path) float32, features (N, E) float32
* `classify(pixels, task_names)` -> {task: logits (N, C)}: one pass per distinct path
* `encode_images(pixels)` -> (N, E) features on the base path (zero-shot / few-shot scoring)
* `encode_texts(texts)` -> (N, E) normalized text features (for request-time labels)

`open_runtime(source, kind)` picks the implementation: a bundle directory tries TensorRT (only
if importable and engines are present), then ONNX Runtime CUDA, then ONNX Runtime CPU; a head
file (`*.head.safetensors`) runs in PyTorch: folded, fp16 with CUDA graphs on a GPU
(`serving/torch_folded.py`), eagerly in fp32 otherwise. `kind` overrides ("onnx", "torch", ...).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from clipheads.training.files import file_sha256

log = logging.getLogger("clipheads.serving")

RUNTIME_KINDS = ("auto", "tensorrt", "onnx", "onnx-cuda", "onnx-cpu", "torch", "torch-folded")
BUNDLE_FORMAT = "clipheads-bundle"
BUNDLE_FORMAT_VERSION = 1


class RuntimeError_(RuntimeError):
    """A runtime cannot be opened (missing files, bad manifest, unavailable backend)."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    classnames: tuple[str, ...]
    path: int  # index into Runtime.paths
    logit_slice: tuple[int, int]  # columns of this task in the path's logits
    templates: tuple[str, ...] = ("a photo of a {}.",)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Runtime(ABC):
    name: str = "?"
    tasks: dict[str, TaskInfo]
    paths: list[str]  # human-readable path keys, e.g. "image_0.onnx#0"
    preprocess: dict  # {image_size, mean, std, resize, crop}
    identity: str  # backbone fingerprint: few-shot tasks persisted under one identity only
    base_path: int = 0
    logit_scale: float = 100.0
    has_text: bool = True  # False: a bundle without a text graph (no request-time labels)

    def __init__(self) -> None:
        self._lock = threading.Lock()  # sessions/modules are driven from one thread at a time

    @abstractmethod
    def run_path(self, path: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) uint8 -> (logits (N, C_path), features (N, E)), float32."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(T,) strings -> (T, E) normalized float32."""

    # ---- shared -----------------------------------------------------------------------------
    def paths_for(self, task_names: Sequence[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for t in task_names:
            groups.setdefault(self.tasks[t].path, []).append(t)
        return groups

    def classify(self, pixels: np.ndarray, task_names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        names = list(task_names) if task_names is not None else list(self.tasks)
        out: dict[str, np.ndarray] = {}
        for path, group in self.paths_for(names).items():
            logits, _ = self.run_path(path, pixels)
            for t in group:
                a, b = self.tasks[t].logit_slice
                out[t] = logits[:, a:b]
        return out

    def encode_images(self, pixels: np.ndarray, path: Optional[int] = None) -> np.ndarray:
        return self.run_path(self.base_path if path is None else path, pixels)[1]

    def warmup(self) -> None:
        """One pass on every path and the text tower; raises if the runtime is broken."""
        s = int(self.preprocess["image_size"])
        x = np.full((1, 3, s, s), 127, np.uint8)
        for p in range(len(self.paths)):
            logits, feats = self.run_path(p, x)
            if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
                raise RuntimeError_(f"warm-up produced non-finite outputs on path {self.paths[p]}")
        if self.has_text:
            self.encode_texts(["a photo of a thing."])

    def describe(self) -> dict:
        return {
            "runtime": self.name,
            "identity": self.identity,
            "image_size": int(self.preprocess["image_size"]),
            "has_text": self.has_text,
            "paths": list(self.paths),
            "tasks": [{"name": t.name, "labels": list(t.classnames), "path": t.path} for t in self.tasks.values()],
        }


# ---- PyTorch eager (head artifact) ----------------------------------------------------------
class TorchRuntime(Runtime):
    """Runs a head artifact eagerly: the fallback and the reference for parity."""

    def __init__(self, head_path: str | os.PathLike, device: Optional[str] = None):
        super().__init__()
        import torch

        from clipheads.training.artifact import load_head

        self._torch = torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        self.name = f"torch-{'cuda' if device.startswith('cuda') else 'cpu'}"
        art = load_head(head_path)
        head = art.build(device=device).eval()
        self.head = head
        bb = head.backbone
        pre = art.preprocess
        self.preprocess = pre.to_json()
        self._mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.logit_scale = float(bb.logit_scale.detach().cpu())
        self.identity = backbone_identity(art.backbone)
        has_vision = "vision" in type(head).towers or not head.foldable
        self.paths, self.tasks, self._path_task = [], {}, []
        self._class_w: dict[int, "torch.Tensor"] = {}
        with torch.no_grad():
            for i, spec in enumerate(head.tasks):
                if has_vision or not self.paths:
                    self.paths.append(f"head#{i}")
                    self._path_task.append(i)
                p = len(self.paths) - 1 if has_vision else 0
                start = sum(len(t.classnames) for t in self.tasks.values() if t.path == p)
                self.tasks[spec.name] = TaskInfo(
                    spec.name, tuple(spec.classnames), p, (start, start + len(spec.classnames)), tuple(spec.templates)
                )
                if head.foldable:
                    self._class_w[i] = head.text_features(spec.classnames, i).float()  # (C, E)
        self._task_index = {spec.name: i for i, spec in enumerate(head.tasks)}
        if has_vision:  # the plain CLIP image path for zero-shot / few-shot scoring
            self.paths.append("backbone")
            self._path_task.append(-1)
            self.base_path = len(self.paths) - 1
        else:
            self.base_path = 0

    def _pixels(self, pixels: np.ndarray):
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).float().div_(255.0)
        return (x - self._mean) / self._std

    def run_path(self, path: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        head = self.head
        with self._lock, torch.no_grad():
            x = self._pixels(pixels)
            ti = self._path_task[path]
            if ti < 0:
                f = head.backbone.encode_image(x)
                return np.zeros((len(x), 0), np.float32), f.float().cpu().numpy()
            f = head.image_features(x, ti).float()  # (N, E)
            cols = []
            for name, t in self.tasks.items():
                if t.path != path:
                    continue
                i = self._task_index[name]
                if i in self._class_w:
                    cols.append(self.logit_scale * f @ self._class_w[i].t())
                else:  # image-conditioned heads (CoCoOp): the method computes its own logits
                    cols.append(head.logits(x, i).float())
            return torch.cat(cols, dim=1).cpu().numpy(), f.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        bb = self.head.backbone
        with self._lock, torch.no_grad():
            tokens = bb.tokenize(list(texts)).to(self.device)
            return bb.encode_text(tokens).float().cpu().numpy()


# ---- ONNX Runtime (export bundle) ----------------------------------------------------------
def source_sha256(source: str | os.PathLike) -> str:
    """The content fingerprint of a bundle (its manifest.json, which holds the sha256 of every
    graph) or of a head file."""
    src = Path(source)
    return file_sha256(src / "manifest.json" if src.is_dir() else src)


def backbone_identity(backbone: dict) -> str:
    """arch:pretrained:weights-sha prefix, from a head's or manifest's `backbone` entry: few-shot
    tasks are persisted under it, and a head swap must keep it."""
    sha = str(backbone.get("weights_sha256") or "")
    return f"{backbone.get('arch')}:{backbone.get('pretrained')}:{sha[:16]}"


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Read and validate a bundle's manifest.json (the contract in DESIGN.md / issue 7)."""
    root = Path(bundle)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise RuntimeError_(f"{root}: not a clipheads bundle (no manifest.json)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError_(f"{mpath}: unreadable manifest ({err})") from None
    if m.get("format") != BUNDLE_FORMAT:
        raise RuntimeError_(f"{mpath}: format {m.get('format')!r} is not {BUNDLE_FORMAT!r}")
    if m.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise RuntimeError_(
            f"{mpath}: bundle format_version {m.get('format_version')!r} is not supported "
            f"(this clipheads serves {BUNDLE_FORMAT_VERSION}); re-export the bundle"
        )
    for key in ("preprocess", "tasks", "graphs"):
        if key not in m:
            raise RuntimeError_(f"{mpath}: manifest has no {key!r}")
    for f in m["graphs"]:
        if Path(f).name != f:
            raise RuntimeError_(f"{mpath}: graph file name {f!r} must be a plain file name")
    return m


def index_tasks(tasks: Sequence[dict]) -> tuple[list[tuple[str, int]], dict[str, TaskInfo]]:
    """Manifest-style task entries ({name, classnames, graph, task_index, logit_slice, templates})
    -> the distinct image paths (graph, task_index) in first-use order, and each task's TaskInfo."""
    keys: list[tuple[str, int]] = []
    infos: dict[str, TaskInfo] = {}
    for t in tasks:
        key = (t["graph"], int(t.get("task_index", 0)))
        if key not in keys:
            keys.append(key)
        a, b = t["logit_slice"]
        infos[t["name"]] = TaskInfo(t["name"], tuple(t["classnames"]), keys.index(key), (int(a), int(b)),
                                    tuple(t.get("templates") or ("a photo of a {}.",)))
    return keys, infos


class OnnxRuntime(Runtime):
    def __init__(self, bundle: str | os.PathLike, providers: Optional[Sequence[str]] = None, verify: bool = True,
                 image_sessions: bool = True):
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
        opts = ort.SessionOptions()
        threads = int(os.environ.get("CLIPHEADS_ORT_THREADS", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        spin = os.environ.get("CLIPHEADS_ORT_SPIN", "")
        if spin in ("0", "1"):  # "0": idle intra-op threads sleep instead of spinning (shared cores)
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        self._sessions: dict[str, "ort.InferenceSession"] = {}

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
        self.paths = [f"{g}#{k}" for g, k in self._path_keys]
        if image_sessions:  # False: a subclass runs the image graphs (TensorRT engines)
            for g in dict.fromkeys(g for g, _ in self._path_keys):
                session(g)
        self._inputs = {f: {i.name for i in s.get_inputs()} for f, s in self._sessions.items()}
        text = m.get("text") or {}
        self._text = session(text["graph"]) if text.get("graph") else None
        self.has_text = self._text is not None
        self._ctx_len = int(text.get("context_length", 77))
        self._tokenizer = None
        self._tokenizer_name = text.get("tokenizer") or bb.get("arch")
        self.base_path = 0

    def _feed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if not self._float_input:
            return np.ascontiguousarray(pixels, dtype=np.uint8)
        return ((pixels.astype(np.float32) / 255.0 - self._mean) / self._std).astype(np.float32)

    def run_path(self, path: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fname, k = self._path_keys[path]
        sess = self._sessions[fname]
        feed = {"pixels": self._feed_pixels(pixels)}
        if "task_index" in self._inputs[fname]:
            feed["task_index"] = np.full((len(pixels),), k, np.int64)
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
        (feats,) = self._text.run(["features"], {"tokens": self._tokenize(texts)})
        return feats.astype(np.float32, copy=False)


# ---- TensorRT --------------------------------------------------------------------------------
def tensorrt_available(bundle: Path) -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return any(bundle.glob("*.plan"))


class TensorRTRuntime(OnnxRuntime):
    """Image graphs through the bundle's TensorRT engines (built on this device by `clipheads export
    build-engine`); the text graph stays on ONNX Runtime. Every engine must be compatible with this
    GPU and TensorRT version (`export.tensorrt.select_engines`), else it refuses with the reasons.
    UNVERIFIED ON HARDWARE: written against the TensorRT 10/11 Python API, not yet run on a GPU."""

    def __init__(self, bundle: str | os.PathLike, verify: bool = True):
        super().__init__(bundle, providers=["CPUExecutionProvider"], verify=verify, image_sessions=False)
        from clipheads.export.tensorrt import Engine, TensorRTUnavailable, current_device, select_engines

        root = Path(bundle)
        graphs = sorted({g for g, _ in self._path_keys})
        try:
            here = current_device()
        except TensorRTUnavailable as err:
            raise RuntimeError_(str(err)) from None
        usable, refused = select_engines(self.manifest, graphs, here)
        if refused:
            raise RuntimeError_("TensorRT engines not usable here: " + "; ".join(f"{g}: {why}" for g, why in refused.items()))
        prof = (self.manifest.get("tensorrt") or {}).get("profile") or {}
        max_batch = int(prof.get("max") or self.manifest.get("max_batch", 64))
        self._engines = {g: Engine(root / f, max_batch) for g, f in usable.items()}
        self.name = "tensorrt"

    def run_path(self, path: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fname, k = self._path_keys[path]
        feed = {"pixels": self._feed_pixels(pixels)}
        if "task_index" in self._engines[fname].inputs:
            feed["task_index"] = np.full((len(pixels),), k, np.int64)
        with self._lock:  # one execution context per engine
            out = self._engines[fname](feed, ["logits", "features"])
        return out["logits"], out["features"]


# ---- selection -------------------------------------------------------------------------------
def register_extra_model_configs() -> None:
    """`CLIPHEADS_MODEL_CONFIGS=DIR[:DIR]`: extra open_clip architecture JSONs (custom/tiny models)."""
    extra = os.environ.get("CLIPHEADS_MODEL_CONFIGS")
    if not extra:
        return
    import open_clip

    for d in extra.split(os.pathsep):
        if d and Path(d).is_dir():
            open_clip.add_model_config(d)


def open_runtime(source: str | os.PathLike, kind: str = "auto", device: Optional[str] = None) -> Runtime:
    """A Runtime for a bundle directory or a head file. Raises RuntimeError_ with a reason."""
    if kind not in RUNTIME_KINDS:
        raise RuntimeError_(f"unknown runtime {kind!r}; choose from {', '.join(RUNTIME_KINDS)}")
    src = Path(source)
    if not src.exists():
        raise RuntimeError_(f"no such bundle or head: {src}")
    if src.is_file():
        if kind not in ("auto", "torch", "torch-folded"):
            raise RuntimeError_(f"{src} is a head file; runtime {kind!r} needs an exported bundle directory")
        register_extra_model_configs()
        import torch

        on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if kind == "torch-folded" or (kind == "auto" and on_cuda):
            from .torch_folded import FoldedTorchRuntime

            try:  # fp16 + CUDA graphs on a GPU (bench/gpu); refuses heads that do not fold (CoCoOp)
                return FoldedTorchRuntime(src, device=device)
            except RuntimeError_ as err:
                if kind == "torch-folded":
                    raise
                log.warning("folded runtime not used (%s); running the head eagerly", err)
        return TorchRuntime(src, device=device)
    if kind in ("torch", "torch-folded"):
        raise RuntimeError_(f"{src} is a bundle; the {kind} runtime runs a head file (*.head.safetensors)")
    if kind == "tensorrt":
        if not tensorrt_available(src):
            raise RuntimeError_(f"{src}: --runtime tensorrt needs the `tensorrt` package and engines in the bundle "
                                "(`clipheads export build-engine BUNDLE` on this device)")
        return TensorRTRuntime(src)
    if kind == "auto" and tensorrt_available(src):
        try:
            return TensorRTRuntime(src)
        except RuntimeError_ as err:  # incompatible/missing engines: the next runtime in line
            log.warning("TensorRT not used (%s); falling back to ONNX Runtime", err)
    import onnxruntime as ort

    providers = None
    if kind == "onnx-cpu":
        providers = ["CPUExecutionProvider"]
    elif kind == "onnx-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError_("onnx-cuda requested but onnxruntime has no CUDAExecutionProvider here")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return OnnxRuntime(src, providers=providers)
