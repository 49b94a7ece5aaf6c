"""`Predictor`: classify images in-process with a bundle or head, as the HTTP server would.

It opens its source with the runtime the server picks (`serving.runtimes.open_runtime`: TensorRT
engines, else ONNX Runtime CUDA, else ONNX Runtime CPU for a bundle; folded fp16 on a GPU or
eager fp32 for a head file), prepares pixels with the one preprocessing function
(`training.preprocess.prepare_pixels`: EXIF orientation, RGB, resize, center crop) and ranks labels
with the softmax the server uses, so `predict` returns what `POST /classify` returns for an image
both accept. It is the more lenient reader: any format Pillow opens (the server takes JPEG, PNG and
WEBP, with byte and aspect-ratio caps), PIL images and arrays; both cap the pixel count.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from clipheads.training.preprocess import DEFAULT_MAX_PIXELS, ImageSource, PreprocessSpec, prepare_pixels

DEFAULT_TEMPLATES = ("a photo of a {}.",)
Images = Union[ImageSource, Sequence[ImageSource]]


class Predictor:
    """Classify PIL images, numpy arrays, file paths or encoded bytes with a bundle or a head.

    Args:
        source: an export bundle directory, a `*.head.safetensors` file, a model-store tag
            (`clipheads models save`), or a trained `HeadMethod` (e.g. from `clipheads.train`).
        runtime: "auto" (the best available here) or one of `serving.runtimes.RUNTIME_KINDS`.
        device: the PyTorch device for head files ("auto"/None: CUDA when available); an in-memory
            head runs on its own backbone's device.
        batch_size: images per runtime call.
        pretrained: where a head file's backbone weights are now, if they moved (checked against
            the sha256 the head records; a bundle holds its backbone and ignores it).

    Example:
        >>> from clipheads import Predictor
        >>> p = Predictor("bundle/")                                 # doctest: +SKIP
        >>> p.predict("cat.jpg", top_k=2)                           # doctest: +SKIP
        {'pets': [{'label': 'cat', 'score': 0.97}, {'label': 'dog', 'score': 0.02}]}
        >>> p.zero_shot(["a.jpg", "b.png"], ["a cat", "a dog"])[0][0]["label"]  # doctest: +SKIP
        'a cat'
    """

    def __init__(self, source: Any, *, runtime: str = "auto", device: Optional[str] = None, batch_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pretrained: Optional[str] = None):
        from clipheads.serving.runtimes import open_runtime

        self._tmp = None
        path = self._source_path(source)
        own = getattr(source, "backbone", None) if self._tmp is not None else None  # its weights may be nowhere else
        self.runtime = open_runtime(str(path), runtime, device=device, weights=pretrained, backbone=own)
        self.source = str(path) if self._tmp is None else "<in-memory head>"
        self.spec = PreprocessSpec.from_json(self.runtime.preprocess)
        self.batch_size = max(1, int(batch_size))
        self.max_pixels = max_pixels

    def _source_path(self, source: Any) -> Path:
        from clipheads.training.methods.base import HeadMethod

        if isinstance(source, HeadMethod):
            from clipheads.training.artifact import save_head

            self._tmp = tempfile.TemporaryDirectory(prefix="clipheads-predictor-")
            return save_head(source, Path(self._tmp.name) / "head.head.safetensors")
        if isinstance(source, (str, os.PathLike)) and not Path(source).expanduser().exists():
            from clipheads.serving.model_store import resolve_source  # a model-store tag

            return resolve_source(str(source))
        return Path(source).expanduser()

    # ---- what it holds -------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, list[str]]:
        """{task: labels} of the source's tasks."""
        return {n: list(t.classnames) for n, t in self.runtime.tasks.items()}

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    def __repr__(self) -> str:
        return f"Predictor({self.source!r}, runtime={self.runtime.name!r}, tasks={list(self.runtime.tasks)})"

    # ---- pixels ----------------------------------------------------------------------------------
    def pixels(self, images: Images, first_index: int = 0) -> np.ndarray:
        """(N, 3, S, S) uint8: what the server feeds its runtime for these images. ValueError
        naming the image (counted from `first_index`) that cannot be read."""
        items, _ = _as_list(images)
        out = np.zeros((len(items), 3, self.spec.image_size, self.spec.image_size), np.uint8)
        for i, img in enumerate(items):
            try:
                out[i] = prepare_pixels(img, self.spec, self.max_pixels)
            except (OSError, ValueError, TypeError) as err:  # unreadable, too large, wrong type
                raise ValueError(f"image {first_index + i}: {type(err).__name__}: {err}") from None
        return out

    def _batches(self, items: list):
        """Pixels `batch_size` images at a time: memory stays one batch whatever the list's length."""
        for a in range(0, len(items), self.batch_size):
            yield self.pixels(items[a:a + self.batch_size], first_index=a)

    # ---- predictions -----------------------------------------------------------------------------
    def predict(self, images: Images, tasks: Optional[Sequence[str]] = None, top_k: int = 5):
        """Per image, per task, the ranked `{label, score}` list (`POST /classify`'s `predictions`).

        One image in -> one dict; a list (or an (N, H, W, 3) array) -> a list of dicts.
        `tasks`: a subset of `self.tasks` (default: all)."""
        from clipheads.serving.runtimes import ranked, softmax

        items, single = _as_list(images)
        names = self._check_tasks(tasks)
        k = _check_top_k(top_k)
        per_task: dict[str, list] = {n: [] for n in names}
        for batch in self._batches(items):
            for n, logits in self.runtime.classify(batch, names).items():
                labels = self.runtime.tasks[n].classnames
                per_task[n] += [ranked(p, labels, k) for p in softmax(logits)]
        preds = [{n: per_task[n][i] for n in names} for i in range(len(items))]
        return preds[0] if single else preds

    def embed(self, images: Images) -> np.ndarray:
        """(N, E) L2-normalised image features of the zero-shot path: the plain image tower when the
        bundle ships one, else the head's own (first task's) image tower (`bundle.zero_shot_path`)."""
        items, _ = _as_list(images)
        feats = [self.runtime.encode_images(b) for b in self._batches(items)]
        if not feats:
            return np.zeros((0, self.embed_dim), np.float32)
        f = np.concatenate(feats)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    @property
    def embed_dim(self) -> int:
        """Width of `embed`'s features (one blank image through the zero-shot path, measured once)."""
        if getattr(self, "_embed_dim", None) is None:
            blank = np.zeros((1, 3, self.spec.image_size, self.spec.image_size), np.uint8)
            self._embed_dim = int(self.runtime.encode_images(blank).shape[-1])
        return self._embed_dim

    def label_embeddings(self, labels: Sequence[str], templates: Optional[Sequence[str]] = None) -> np.ndarray:
        """(L, E) normalised text embeddings: each label in every template, averaged. Templates are
        checked as the server checks them (non-empty strings that read differently to the text
        encoder; templates with one `{}` and nothing else to format): ValueError if not."""
        from clipheads.serving.front.templates import template_problem

        labels = _check_labels(labels)
        if isinstance(templates, str):
            raise ValueError("templates is a list of strings, not one string")
        for t in templates or ():
            problem = template_problem(t)
            if problem:
                raise ValueError(f"template {t!r}: {problem}")
        return label_embeddings(self.runtime, labels, tuple(templates or DEFAULT_TEMPLATES))

    def zero_shot(self, images: Images, labels: Sequence[str], templates: Optional[Sequence[str]] = None,
                  top_k: int = 5):
        """Rank free-text `labels` per image (`POST /zero_shot`): one image -> one ranked list."""
        from clipheads.serving.runtimes import ranked, softmax

        items, single = _as_list(images)
        labels = _check_labels(labels)
        if not self.runtime.has_text:
            raise ValueError("this bundle has no text graph: request-time labels are unavailable")
        k = _check_top_k(top_k)
        w = self.label_embeddings(labels, templates)
        probs = softmax(self.runtime.logit_scale * self.embed(items) @ w.T)
        out = [ranked(p, labels, k) for p in probs]
        return out[0] if single else out

    def _check_tasks(self, tasks: Optional[Sequence[str]]) -> list[str]:
        """The tasks asked for, as `POST /classify` checks them (known, each once)."""
        if tasks is None:
            return list(self.runtime.tasks)
        if isinstance(tasks, str):
            raise ValueError(f"tasks is a list of task names (tasks=[{tasks!r}]), not one string")
        names = list(tasks)
        unknown = [t for t in names if t not in self.runtime.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this source has: {', '.join(self.runtime.tasks)}")
        if not names or len(set(names)) != len(names):
            raise ValueError("tasks must name at least one task, each once")
        return names

    def close(self) -> None:
        """Drop the runtime (its sessions, graphs and GPU memory go once nothing else holds them)
        and the in-memory head's temporary file."""
        self.runtime = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def label_embeddings(runtime, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(L, E): every label in every template through the runtime's text tower, averaged over
    templates and renormalised (the server's label embeddings)."""
    texts = [t.format(lab.replace("_", " ")) for lab in labels for t in templates]
    f = np.asarray(runtime.encode_texts(texts), np.float32).reshape(len(labels), len(templates), -1).mean(axis=1)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _as_list(images: Images) -> tuple[list, bool]:
    """(items, was_single): a single image, a list/tuple, or an (N, H, W, C) array."""
    if isinstance(images, np.ndarray):
        return (list(images), False) if images.ndim == 4 else ([images], True)
    if isinstance(images, (list, tuple)):
        return list(images), False
    return [images], True


def _check_labels(labels: Sequence[str]) -> list[str]:
    """The server's label rules (`serving.front.labels`), as a ValueError."""
    from clipheads.serving.front.labels import clean_labels

    if isinstance(labels, str):
        raise ValueError(f"labels is a list of strings (labels=[{labels[:40]!r}]), not one string")
    try:  # any iterable of strings (a tuple, a numpy array, dict keys), as `tasks` takes
        labels = list(labels)
    except TypeError:
        pass
    out, problem = clean_labels(labels)
    if problem:
        raise ValueError(problem[1])
    return out


def _check_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError("top_k must be a positive integer")
    return top_k


