"""The endpoints' bodies: plan the request, call the encoder, shape the answer.

Each takes the `Front` and the request's fields (as BentoML parsed them) and returns the JSON
answer or raises `ApiError` / `ImageRejected` / `TaskStoreError`; `Front.answer` turns those into
our error bodies. serving/service.py binds them to HTTP routes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np

from ..metrics import TASK_PREDICTIONS
from ..runtimes import ranked, softmax
from ..tasks import FewShotTask, TaskStore, check_name
from .core import Front
from .errors import ApiError
from .validate import check_labels, check_templates, check_top_k, read_images, reload_source, without_server_paths


async def classify(front: Front, images: list[Path | bytes], images_b64: list[str], tasks: Optional[list[str]],
                   top_k: int) -> dict:
    k = check_top_k(top_k)
    bundle_tasks = front.all_tasks()
    names = list(tasks) if tasks else list(bundle_tasks)
    if len(names) > 64 or len(set(names)) != len(names):
        raise ApiError(422, "invalid_tasks", "'tasks' must be at most 64 distinct names")
    wanted = [n for n in names if n not in bundle_tasks]
    few = await front.stored(_few_shot_tasks, front.store, wanted, list(bundle_tasks)) if wanted else {}
    blobs = read_images(front.cfg, images, images_b64, front.cfg.max_images)
    pixels = await front.decode(blobs)
    info = front.info
    paths = sorted({bundle_tasks[n]["path"] for n in names if n in bundle_tasks}
                   | ({info["base_path"]} if few else set()))
    enc, version = await front.encode(pixels, paths)
    per_task: dict[str, list[list[dict]]] = {}
    for n in names:
        if n in few:
            logits = few[n].logits(enc[info["base_path"]]["features"], info["logit_scale"])
            labels = few[n].labels
        else:
            a, b = info["slices"][n]
            logits = enc[bundle_tasks[n]["path"]]["logits"][:, a:b]
            labels = bundle_tasks[n]["labels"]
        probs = softmax(logits)
        per_task[n] = [ranked(p, labels, k) for p in probs]
        TASK_PREDICTIONS.labels(task=n if n in bundle_tasks else "few_shot").inc(len(pixels))
    preds = [{n: per_task[n][i] for n in names} for i in range(len(pixels))]
    return {"predictions": preds, "runtime": info["runtime"], "head_version": version}


def _few_shot_tasks(store: TaskStore, names: list, bundle_names: list[str]) -> dict[str, FewShotTask]:
    """The registered tasks `names` (one trip to the store's thread), or 422 naming the known ones."""
    found = {}
    for n in names:
        task = store.get(n) if isinstance(n, str) and len(n) <= 64 else None
        if task is None:
            known = ", ".join(sorted(bundle_names) + store.names())
            raise ApiError(422, "unknown_task", f"unknown task {str(n)[:64]!r}; known: {known}")
        found[n] = task
    return found


async def zero_shot(front: Front, labels: list[str], images: list[Path], images_b64: list[str],
                    templates: Optional[list[str]], top_k: int) -> dict:
    k = check_top_k(top_k)
    labs = check_labels(front.cfg, labels)
    temps = check_templates(front.cfg, templates)
    blobs = read_images(front.cfg, images, images_b64, front.cfg.max_images)
    pixels = await front.decode(blobs)
    feats, w, version = await front.features_and_text(pixels, labs, temps)
    probs = softmax(front.info["logit_scale"] * feats @ w.T)
    TASK_PREDICTIONS.labels(task="zero_shot").inc(len(pixels))
    return {"predictions": [ranked(p, labs, k) for p in probs], "runtime": front.info["runtime"],
            "head_version": version}


async def register_task(front: Front, ctx: bentoml.Context, name: str, labels: list[str], example_labels: list[str],
                        images: list[Path], images_b64: list[str], templates: Optional[list[str]],
                        replace: bool) -> dict:
    check_name(name)
    if name in front.all_tasks():
        raise ApiError(409, "task_exists", f"{name!r} is a task of the loaded bundle")
    labs = check_labels(front.cfg, labels)
    temps = check_templates(front.cfg, templates)
    blobs = read_images(front.cfg, images, images_b64, front.cfg.max_examples)
    if not isinstance(example_labels, list) or len(example_labels) != len(blobs):
        raise ApiError(422, "invalid_example_labels", "'example_labels' needs one label per example image")
    index = {l: i for i, l in enumerate(labs)}
    try:
        targets = np.array([index[str(l).strip()] for l in example_labels], np.int64)
    except KeyError as err:
        raise ApiError(422, "invalid_example_labels", f"example label {str(err)[:80]} is not in 'labels'") from None
    missing = [l for l in labs if l not in {labs[t] for t in targets}]
    if missing:
        raise ApiError(422, "missing_examples", f"no example image for label(s) {missing[:5]}")
    pixels = await front.decode(blobs)
    keys, text, version = await front.features_and_text(pixels, labs, temps)
    task = await front.stored(front.store.add, name, labs, keys, targets, text, replace=bool(replace))
    ctx.response.status_code = 201
    return {**task.summary(), "head_version": version}


async def list_tasks(front: Front) -> dict:
    bundle = [{"name": t["name"], "kind": "bundle", "labels": t["labels"]} for t in front.info["tasks"]]
    return {"tasks": bundle + await front.stored(front.store.list), "runtime": front.info["runtime"],
            "head_version": front.head_version}


async def delete_task(front: Front, name: Any) -> dict:
    if isinstance(name, str) and name in front.all_tasks():
        raise ApiError(409, "task_readonly", f"{name!r} belongs to the loaded bundle and cannot be deleted")
    check_name(name)
    if not await front.stored(front.store.delete, name):
        raise ApiError(404, "unknown_task", f"no registered task {name!r}")
    return {"deleted": name}


async def reload_head(front: Front, source: Any) -> dict:
    path = reload_source(front.cfg, source)
    res = await front.call_encoder("reload", str(path))
    if "error" in res:
        raise ApiError(409 if res["error"] == "incompatible_head" else 422, res["error"],
                       without_server_paths(res["detail"], path, source))
    front.head_version = res["version"]
    return {"head_version": res["version"], "previous": res["previous"]}
