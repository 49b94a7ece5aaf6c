"""The parity gate: eager PyTorch (the head's own `logits`) vs the exported graphs in ONNX Runtime.

It can fail, and a failure stops the bundle (exit 1 in the CLI). It judges on real images
(`gate_images.py`: the head's own training/validation images when its record names data on disk,
else the synthetic world, every domain; `ExportOptions.probes`, 256 by default), never on noise,
and reports top-1 agreement with its 95% Wilson interval. Gates by precision:

| precision | logits                 | top-1 agreement (real images) | features cosine | random-init backbone     |
|-----------|------------------------|-------------------------------|-----------------|--------------------------|
| fp32      | max abs delta <= 1e-3  | 100 %                         | >= 0.9999 (min) | 100 % on the decided half |
| fp16      | -                      | >= 99.5 %                     | >= 0.999 (min)  | 99.5 % on the decided half |
| int8      | -                      | >= 99 %                       | -               | 99 % on the decided half + min cosine >= 0.995 |

The fp32 logit bound is RELIABILITY.md B5 #21's 1e-5 on the unit features at CLIP's logit scale
of 100 (looser at a random-init scale of ~14, where the cosine floor still holds the features).

A random-init backbone (record `pretrained` "none"; `ExportOptions.gate`) has near-tied logits on
every image: a top-1 flip there says nothing about the graph. Its gate counts agreement only on
the *decided half*, the images whose reference top-2 margin is at least the median margin (a
property of the reference alone, so the graph under test cannot move the subset), and adds a
feature-cosine floor; raw agreement is still reported. The report also says how many
disagreements are near-ties (reference top-2 margin <= 2 x that row's max |delta logit|). On real
images, a task whose every flip is within the graph's typical error (margin <= 2 x the median
row's max |delta logit|) is judged on its expected agreement instead of the raw count
(`real_gate_failure`): a few coin-flip answers in 256 images cannot swing it, a gross error can.

Every task is checked on its own path (in batches of 8, and its first image alone: batch 1 must
answer as the batch does), every multi-task graph also on a mixed-task batch (rows must equal the
per-task calls), and the text graph against `Backbone.encode_text` on the tasks'
prompts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from .fold import FoldPlan


@dataclass(frozen=True)
class Gate:
    precision: str
    max_abs_logit: Optional[float]  # None: not gated
    min_top1: float
    min_cosine: Optional[float]
    min_cosine_random_init: Optional[float] = None  # the extra floor of the random-init gate


GATES = {
    "fp32": Gate("fp32", 1e-3, 1.0, 0.9999),
    "fp16": Gate("fp16", None, 0.995, 0.999),
    "int8": Gate("int8", None, 0.99, None, 0.995),
}
GATE_MODES = ("real", "random-init")


def top2_margin(ref: np.ndarray) -> np.ndarray:
    """Each row's reference top-1 minus top-2 logit (inf with one class)."""
    if ref.shape[1] < 2:
        return np.full(len(ref), np.inf)
    srt = np.sort(ref, axis=1)
    return srt[:, -1] - srt[:, -2]


def near_tie_disagreements(ref: np.ndarray, got: np.ndarray) -> int:
    """Top-1 disagreements on rows the reference itself leaves undecided at this precision: its
    top-2 margin within 2 x the row's max |delta logit|."""
    near_tie = top2_margin(ref) <= 2 * np.abs(got - ref).max(1)
    return int(((got.argmax(1) != ref.argmax(1)) & near_tie).sum())


def flips_within_typical_error(ref: np.ndarray, got: np.ndarray) -> tuple[int, int]:
    """(top-1 disagreements, those whose reference top-2 margin is within 2 x the graph's typical
    error: the median over rows of the max |delta logit|). Unlike `near_tie_disagreements`, a row
    with a gross error of its own does not excuse itself."""
    flips = got.argmax(1) != ref.argmax(1)
    typical = float(np.median(np.abs(got - ref).max(1))) if len(ref) else 0.0
    return int(flips.sum()), int((flips & (top2_margin(ref) <= 2 * typical)).sum())


def distinct_columns(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ref` and `got` without the repeats of a class whose reference column equals an earlier one
    on every row (two labels the tokenizer reads alike: one embedding). Such a pair is a tie that
    never resolves, which would count as a likely flip on every row of `expected_agreement`."""
    if ref.ndim != 2 or ref.shape[1] < 2 or len(ref) == 0:
        return ref, got
    _, first = np.unique(ref, axis=1, return_index=True)
    if len(first) == ref.shape[1]:
        return ref, got
    keep = np.sort(first)
    return ref[:, keep], got[:, keep]


def task_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """`agreement` plus the two flip counts the gates read (near-ties; within the typical error)."""
    ref, got = distinct_columns(ref, got)
    return {**_agreement(ref, got), "near_tie_disagreements": near_tie_disagreements(ref, got),
            "flips_within_typical_error": flips_within_typical_error(ref, got)[1]}


def real_gate_failure(a: dict, min_top1: float) -> Optional[str]:
    """Why a task (`a`: its `task_agreement`) fails the real-image gate, or None. Raw top-1
    agreement must reach `min_top1`, unless every flip is within the graph's typical error
    (`flips_within_typical_error`): then the expected agreement (every image's margin against every
    image's shrinkage, far less noisy than a count of a few flips in a few hundred images) must."""
    if a["top1_agreement"] >= min_top1:
        return None
    flips, ties = a["top1_disagreements"], a["flips_within_typical_error"]
    if flips == ties and a["expected_agreement"] >= min_top1:
        return None
    lo, hi = a["top1_ci95"]
    why = (f"expected {a['expected_agreement']:.2%}, every flip within the typical error" if flips == ties else
           f"{flips - ties} of {flips} flips beyond 2x the typical error")
    return (f"top-1 agreement {a['top1_agreement']:.2%} (95% CI {lo:.2%}-{hi:.2%}, n={a['n']}; {why}) "
            f"< {min_top1:.1%}")


def gate_mode_for(backbone_record: dict, requested: str = "auto") -> str:
    """"random-init" for a backbone without pretrained weights (record `pretrained` none), else "real"."""
    if requested != "auto":
        if requested not in GATE_MODES:
            raise ValueError(f"gate must be auto or one of {GATE_MODES}, got {requested!r}")
        return requested
    return "random-init" if str(backbone_record.get("pretrained") or "none").lower() in ("none", "") else "real"


def expected_agreement(ref: np.ndarray, got: np.ndarray, rows: Optional[np.ndarray] = None) -> float:
    """A smooth estimate of top-1 agreement that resolves far below 1/n: a row flips when the
    graph shrinks its reference top-2 margin by more than the margin, so pair every row's margin
    with every row's shrinkage (taken as independent of margins): 1 - P(shrink >= margin) over n^2
    pairs. Used to pick the int8 recipe on a few hundred calibration images."""
    if ref.shape[1] < 2 or len(ref) == 0:
        return 1.0
    order = np.argsort(ref, axis=1)
    top, second = order[:, -1], order[:, -2]
    idx = np.arange(len(ref))
    margin = ref[idx, top] - ref[idx, second]
    err = np.sort(margin - (got[idx, top] - got[idx, second]))  # how much each row's margin shrank
    m = margin if rows is None else margin[rows]
    if len(m) == 0:
        return 1.0
    flips = 1.0 - np.searchsorted(err, m, side="left") / len(err)  # share of errors >= each margin
    return float(1.0 - flips.mean())


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement of `got` with `ref` (N, C) logits: raw with its 95% Wilson interval, and on
    the decided half (reference top-2 margin >= its median). Identical columns count once."""
    return _agreement(*distinct_columns(ref, got))


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """`agreement` on columns already made distinct."""
    from .gate_images import wilson_interval

    agree = got.argmax(1) == ref.argmax(1)
    margin = top2_margin(ref)
    decided = margin >= np.median(margin)
    k, n = int(agree.sum()), len(agree)
    return {"top1_agreement": k / max(n, 1), "top1_ci95": list(wilson_interval(k, n)), "n": n,
            "expected_agreement": expected_agreement(ref, got),
            "expected_agreement_decided_half": expected_agreement(ref, got, decided),
            "top1_disagreements": n - k, "decided_half_n": int(decided.sum()),
            "top1_agreement_decided_half": float(agree[decided].mean()) if decided.any() else 1.0,
            "median_reference_margin": float(np.median(margin)) if n else 0.0}
# the mixed-task batch must reproduce the per-task calls of the *same* graph
MIXED_BATCH_TOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2}


# ---- probe images ---------------------------------------------------------------------------
def _structured(size: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = [xx, yy, (xx + yy) / 2, np.hypot(xx - 0.5, yy - 0.5) * 1.4][i % 4]
        arr = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        d = ImageDraw.Draw(img)
        for _ in range(1 + i % 3):
            x0, y0 = rng.integers(0, size // 2, 2)
            x1, y1 = x0 + rng.integers(size // 6, size // 2 + 1), y0 + rng.integers(size // 6, size // 2 + 1)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            [d.ellipse, d.rectangle, lambda b, fill: d.polygon([(b[0], b[3]), ((b[0] + b[2]) // 2, b[1]), (b[2], b[3])], fill=fill)][
                int(rng.integers(3))]([int(x0), int(y0), int(x1), int(y1)], fill=fill)
        out.append(np.asarray(img))
    return out


def _synthetic_world(size: int, n: int, seed: int) -> list[np.ndarray]:
    try:
        from clipheads.training.data import synth
    except Exception:  # noqa: BLE001 - the world is optional; structured images stand in
        return []
    out = []
    for i in range(n):
        domain = synth.DOMAINS[i % len(synth.DOMAINS)]
        cls = synth.CLASSES[(i * 7) % len(synth.CLASSES)]
        inst = synth.sample_instance(domain, cls, (seed, 77, i))
        out.append(np.asarray(synth.render(inst, size).convert("RGB")))
    return out


def probe_images(image_size: int, n: int = 24, seed: int = 0) -> tuple[np.ndarray, dict]:
    """uint8 (n, 3, S, S) probe images and a description for the manifest (about half from the
    synthetic world when available, a quarter structured, the rest uniform noise)."""
    rng = np.random.default_rng(seed)
    n_noise = max(1, n // 4)
    world = _synthetic_world(image_size, (n - n_noise) // 2 + (n - n_noise) % 2, seed)
    n_struct = n - n_noise - len(world)
    imgs = world + _structured(image_size, n_struct, rng)
    imgs += [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(n_noise)]
    arr = np.stack(imgs).transpose(0, 3, 1, 2).copy()  # (n, 3, S, S)
    desc = {"n": n, "seed": seed, "synthetic_world": len(world), "structured": n_struct, "noise": n_noise,
            "image_size": image_size}
    return arr, desc


# ---- comparison -----------------------------------------------------------------------------
def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return float((a * b).sum(-1).min())


def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(
    plan: FoldPlan,
    graph_paths: Mapping[str, str],
    precision: str = "fp32",
    text_path: Optional[str] = None,
    probes: Optional[np.ndarray] = None,
    probe_desc: Optional[dict] = None,
    batch: int = 8,
    mode: str = "real",
) -> dict:
    """Run every task's eager head and its exported graph on the probes (real images, see the
    module doc). Returns the report (JSON-ready) with `passed`; nothing is raised on a failed gate
    (the caller decides). `mode`: "real" or "random-init" (`gate_mode_for`)."""
    gate = GATES[precision]
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
    size = plan.preprocess.image_size
    if probes is None:
        probes, probe_desc = probe_images(size)
    mean = torch.tensor(plan.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(plan.preprocess.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(probes).float() / 255.0 - mean) / std  # what eager sees
    feed_px = probes if plan.input_dtype == "uint8" else x.numpy().astype(np.float32)
    sessions = {g: _session(p) for g, p in graph_paths.items()}

    def run(graph: str, px: np.ndarray, ti: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = [sessions[graph].run(["logits", "features"], {"pixels": px[i:i + batch], "task_index": ti[i:i + batch]})
                for i in range(0, len(px), batch)]
        return (np.concatenate([o[0] for o in outs]).astype(np.float32),
                np.concatenate([o[1] for o in outs]).astype(np.float32))

    tasks, failures = {}, []
    graph_outputs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for t in plan.tasks:
        key = (t.graph, t.task_index)
        if key not in graph_outputs:
            graph_outputs[key] = run(t.graph, feed_px, np.full(len(probes), t.task_index, np.int64))
        logits, feats = graph_outputs[key]
        a, b = t.logit_slice
        got = logits[:, a:b]
        h = plan.heads[t.head]
        with torch.no_grad():
            ref = torch.cat([h.logits(x[i:i + batch], t.head_task) for i in range(0, len(x), batch)]).float().numpy()
            ref_f = torch.cat([h.image_features(x[i:i + batch], t.head_task)
                               for i in range(0, len(x), batch)]).float().numpy()
        r = {
            "max_abs_logit_diff": float(np.abs(got - ref).max()),
            **task_agreement(ref, got),
            "min_feature_cosine": _cos_min(feats, ref_f),
            "graph": t.graph, "task_index": t.task_index,
        }
        tasks[t.name] = r
        if gate.max_abs_logit is not None and r["max_abs_logit_diff"] > gate.max_abs_logit:
            failures.append(f"{t.name}: max |delta logit| {r['max_abs_logit_diff']:.3g} > {gate.max_abs_logit:g}")
        if mode == "real" and (problem := real_gate_failure(r, gate.min_top1)):
            failures.append(f"{t.name}: {problem}")
        if mode == "random-init":
            if r["top1_agreement_decided_half"] < gate.min_top1:
                failures.append(f"{t.name}: top-1 agreement on the decided half {r['top1_agreement_decided_half']:.2%}"
                                f" (n={r['decided_half_n']}) < {gate.min_top1:.1%}")
            floor = gate.min_cosine_random_init
            if floor is not None and r["min_feature_cosine"] < floor:
                failures.append(f"{t.name}: min feature cosine {r['min_feature_cosine']:.5f} < {floor} (random-init gate)")
        if gate.min_cosine is not None and r["min_feature_cosine"] < gate.min_cosine:
            failures.append(f"{t.name}: min feature cosine {r['min_feature_cosine']:.5f} < {gate.min_cosine}")

    # mixed-task batches: one call with task_index varying per row == the per-task calls
    mixed = {}
    for g in plan.graphs:
        rows = sorted({t.task_index for t in g.tasks})
        if len(rows) < 2:
            continue
        ti = np.asarray([rows[i % len(rows)] for i in range(len(probes))], np.int64)
        logits, _ = run(g.name, feed_px, ti)
        want = np.stack([graph_outputs[(g.name, int(k))][0][i] for i, k in enumerate(ti)])
        diff = float(np.abs(logits - want).max())
        mixed[g.name] = {"rows": rows, "max_abs_diff_vs_per_task": diff}
        if diff > MIXED_BATCH_TOL[precision]:
            failures.append(f"{g.name}: mixed-task batch differs from per-task calls by {diff:.3g}")

    # batch 1 (B5 #21: batch sizes 1 and 8): a graph whose batch dimension was fixed or mis-traced
    # at export answers one image differently from the same image inside a batch
    batch_one = {}
    for (graph, task_index), (logits, _) in graph_outputs.items():
        try:
            one, _ = run(graph, feed_px[:1], np.full(1, task_index, np.int64))
        except Exception as err:  # noqa: BLE001 - e.g. a batch dimension fixed at export: a gate failure
            batch_one[f"{graph}#{task_index}"] = None
            failures.append(f"{graph} (task_index {task_index}): cannot run one image: {str(err)[:200]}")
            continue
        diff = float(np.abs(one - logits[:1]).max())
        batch_one[f"{graph}#{task_index}"] = diff
        # dynamic int8 quantizes with each batch's own ranges: a batch of 1 may move as far as the
        # graph itself is from eager, which the gate above judged already; a broken batch dim goes far beyond
        own_error = max((r["max_abs_logit_diff"] for r in tasks.values()
                         if (r["graph"], r["task_index"]) == (graph, task_index)), default=0.0)
        if diff > max(MIXED_BATCH_TOL[precision], 2 * own_error):
            failures.append(f"{graph} (task_index {task_index}): one image alone differs from the same image "
                            f"in a batch of {min(batch, len(probes))} by {diff:.3g}")

    text = None
    if text_path is not None:
        text = check_text_parity(plan, text_path, precision)
        failures += text.pop("failures")

    worst = {
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in tasks.values()),
        "min_top1_agreement": min(r["top1_agreement"] for r in tasks.values()),
        "min_feature_cosine": min(r["min_feature_cosine"] for r in tasks.values()),
        "min_top1_agreement_decided_half": min(r["top1_agreement_decided_half"] for r in tasks.values()),
    }
    return {
        "precision": precision, "gate": asdict(gate), "mode": mode, "passed": not failures, "failures": failures,
        "reference": "eager PyTorch (HeadMethod.logits / image_features), fp32, CPU",
        "runtime": "onnxruntime CPUExecutionProvider",
        "probe": probe_desc or {"n": len(probes)}, "worst": worst, "tasks": tasks, "mixed_batch": mixed,
        "batch_one_max_abs_diff": batch_one, "text": text,
    }


# the same text graph at the used length vs the full context: fp32 must be identical (issue 17)
TEXT_LENGTH_TOL = {"fp32": 1e-5, "fp16": 1e-5}


def check_text_parity(plan: FoldPlan, text_path: str, precision: str) -> dict:
    """The text graph vs eager `Backbone.encode_text` (full context) on the tasks' prompts, fed
    the full context and, for a variable-length graph, the bucketed used length."""
    gate = GATES[precision]
    texts = [tpl.format(c.replace("_", " ")) for t in plan.tasks for c in t.classnames for tpl in t.templates[:2]]
    texts = texts[:64] or ["a photo of a thing."]
    tokens = plan.backbone.tokenize(texts).cpu()
    with torch.no_grad():
        ref = plan.backbone.encode_text(tokens, trim=False).float().numpy()
    sess = _session(text_path)
    feeds = {"full": tokens}
    if plan.text.variable_length:
        feeds["used"] = tokens[:, :plan.backbone.trimmed_length(tokens)]
    got = {k: sess.run(["features"], {"tokens": v.numpy().astype(np.int64)})[0] for k, v in feeds.items()}
    out: dict = {"n": len(texts), "lengths": {k: int(v.shape[1]) for k, v in feeds.items()},
                 "max_abs_diff": max(float(np.abs(g - ref).max()) for g in got.values()),
                 "min_cosine": min(_cos_min(g, ref) for g in got.values()), "failures": []}
    min_cos = gate.min_cosine if gate.min_cosine is not None else (0.9999 if precision == "fp32" else 0.99)
    if out["min_cosine"] < min_cos:
        out["failures"].append(f"text graph: min cosine {out['min_cosine']:.5f} < {min_cos}")
    if "used" in got:
        diff = float(np.abs(got["used"] - got["full"]).max())
        out["used_vs_full_max_abs_diff"] = diff
        tol = TEXT_LENGTH_TOL.get(precision)  # int8: dynamic activation scales depend on the length
        if tol is not None and diff > tol:
            out["failures"].append(f"text graph: used length {out['lengths']['used']} differs from the full "
                                   f"context by {diff:.3g} > {tol:g}")
    return out
