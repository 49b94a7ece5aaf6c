"""Text length sweep (issue 17.2): the bundle's text graph on the used length vs the full context.

    .venv/bin/python bench/export/bench_text.py [--arch ViT-B-32] [--labels 256] [--rounds 3]
        [--out bench/export]

Exports the text graph of a random-init `--arch` as a bundle holds it (`export_text_graph`, the
call `export_heads` makes; or `--bundle DIR` to use a bundle's) and times `--labels` zero-shot
labels ("a photo of a {}.", short labels from the synthetic world's sizes x colours x classes)
end to end as `OnnxRuntime.encode_texts` runs them (tokenize, cut, text graph):

  before   the same bundle read as a pre-17.2 bundle (manifest `text.sequence` "fixed"): every call
           runs the full 77-token context (what 13 s for 256 labels measured)
  after    the shipped bundle: each call cut to its longest label rounded up to 8 tokens

and the sweep: the text graph fed the same labels at lengths 8 and 32 (besides the used one and the
full context: every length >= the used one must give the full context's features, max |diff|
<= 1e-5), plus a label set ~24 words longer through `encode_texts`. Rounds are interleaved (every variant once
per round; best and median reported). Writes OUT/text_length.json and OUT/text_length.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def short_labels(n: int) -> list[str]:
    from clipheads.training.data.synth import CLASSES, COLOURS, SIZES

    out = [f"{s} {c} {k}".replace("_", " ") for s in SIZES for c in COLOURS for k in CLASSES]
    return out[:n]


def padded(labels: list[str], words: int) -> list[str]:
    """Longer labels: each gets `words` extra words (a label set of growing token length)."""
    filler = "with a thin dark outline on a plain pale background seen from above at noon in soft light".split()
    return [lab + (" " + " ".join((filler * 4)[:words]) if words else "") for lab in labels]


class TextCall:
    """OnnxRuntime.encode_texts on a bare text graph: tokenize to the context, cut a dynamic call to
    its bucketed longest label (`_text_cut`, as the runtime reads it from the manifest), run."""

    def __init__(self, path, backbone, cut: bool):
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.log_severity_level = 3
        self._text = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        self._tok = backbone.tokenizer
        pool_type, eos_id = backbone.text_pool
        self._text_cut = (pool_type, eos_id, 8) if cut else None

    def _tokenize(self, texts):
        return self._tok(list(texts)).numpy().astype(np.int64)

    def encode_texts(self, texts):
        from clipheads.training.text_length import trim_tokens

        tokens = self._tokenize(texts)
        if self._text_cut is not None:
            tokens = trim_tokens(tokens, self._text_cut[0], self._text_cut[1], bucket=self._text_cut[2])
        return self._text.run(["features"], {"tokens": np.ascontiguousarray(tokens)})[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--labels", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bundle", default=None, help="time this bundle's text graph (default: export one)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch

    from bench_cpu import machine
    from clipheads.export.fold import TextEncoder
    from clipheads.export.onnx_export import export_text_graph
    from clipheads.serving.runtimes import OnnxRuntime
    from clipheads.training.backbone import Backbone
    from clipheads.training.text_length import text_length

    def log(msg):
        print(f"[bench-text] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model = open_clip.create_model(args.arch, pretrained=None)
    bb = Backbone(model, open_clip.get_tokenizer(args.arch), arch=args.arch, pretrained="none")
    labels = short_labels(args.labels)
    template = "a photo of a {}."
    texts = [template.format(lab) for lab in labels]
    res: dict = {"arch": args.arch, "labels": len(labels), "template": template, "started_unix": int(time.time()),
                 "machine": machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="clipheads-bench-text-") as tmp:
        t0 = time.perf_counter()
        if args.bundle:  # a bundle written by `clipheads export`
            after = OnnxRuntime(args.bundle, providers=["CPUExecutionProvider"])
            before = OnnxRuntime(args.bundle, providers=["CPUExecutionProvider"])
            res["graph"] = f"the bundle's text graph ({args.bundle})"
        else:  # the text graph export_heads puts in a bundle (export_text_graph), without the image side
            path = export_text_graph(TextEncoder(bb), Path(tmp) / "text.onnx")
            after, before = TextCall(path, bb, cut=True), TextCall(path, bb, cut=False)
            res["graph"] = "export_text_graph(TextEncoder) = a bundle's text.onnx, driven like OnnxRuntime.encode_texts"
        res["export_s"] = time.perf_counter() - t0
        log(f"text graph ready in {res['export_s']:.0f} s ({res['graph']})")
        before._text_cut = None  # what a pre-17.2 runtime / "fixed" manifest does: the full context
        tok = after._tokenize(texts)
        used = text_length(tok, "argmax")
        res["context_length"], res["used_length"] = int(tok.shape[1]), int(used)
        res["label_tokens"] = {"min": int(tok.argmax(1).min()) + 1, "max": int(tok.argmax(1).max()) + 1}
        sess = after._text

        def graph_at(length: int):
            return lambda: sess.run(["features"], {"tokens": np.ascontiguousarray(tok[:, :length])})[0]

        sweep_lengths = [8, 32]  # (the used length and the full context are "after" and "before")
        sets = {f"+{w} words": [template.format(lab) for lab in padded(labels, w)] for w in (0, 24)}
        runners = {"before (full context)": lambda: before.encode_texts(texts),
                   "after (used length)": lambda: after.encode_texts(texts)}
        runners.update({f"graph L={n}": graph_at(n) for n in sweep_lengths})
        runners.update({f"after, labels {k}": (lambda t=t: after.encode_texts(t)) for k, t in sets.items()
                        if k != "+0 words"})
        full = graph_at(tok.shape[1])()
        feats = {}
        for name, run in runners.items():
            feats[name] = run()  # warm-up and the features
        feats["after, labels +0 words"] = feats["after (used length)"]
        res["set_lengths"] = {k: int(text_length(after._tokenize(t), "argmax")) for k, t in sets.items()}
        times: dict[str, list[float]] = {n: [] for n in runners}
        for r in range(args.rounds):
            for name, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
            log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        rows = {}
        for name, ts in times.items():
            row = {"best_s": min(ts), "median_s": float(np.median(ts)), "rounds": len(ts)}
            if name.startswith("graph L="):
                n = int(name.split("=")[1])
                row["length"] = n
                row["max_abs_diff_vs_full"] = float(np.abs(feats[name] - full).max()) if n >= used else None
            if name in ("before (full context)", "after (used length)"):
                row["max_abs_diff_vs_full"] = float(np.abs(feats[name] - full).max())
            rows[name] = row
        rows["after, labels +0 words"] = dict(rows["after (used length)"])
        for k, t in sets.items():  # the full-context features of each set (once, untimed: the cost is the 77 row)
            rows[f"after, labels {k}"]["max_abs_diff_vs_before"] = float(
                np.abs(feats[f"after, labels {k}"] - before.encode_texts(t)).max())
        res["rows"] = rows
        b, a = rows["before (full context)"], rows["after (used length)"]
        res["speedup_best"] = b["best_s"] / a["best_s"]
        res["speedup_median"] = b["median_s"] / a["median_s"]
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out_dir = Path(args.out)
    (out_dir / "text_length.json").write_text(json.dumps(res, indent=1))
    write_md(res, out_dir / "text_length.md")
    log(f"speed-up {res['speedup_best']:.2f}x (best), {res['speedup_median']:.2f}x (median)")
    return 0


def write_md(res: dict, path: Path) -> None:
    m = res["machine"]
    rows = res["rows"]
    b, a = rows["before (full context)"], rows["after (used length)"]
    lines = [
        f"# Text length sweep: {res['labels']} zero-shot labels through the bundle's text graph ({res['arch']})", "",
        f"Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('cpu_count'))} CPU(s), shared with other "
        f"engineers' jobs (load {res['loadavg_start']} -> {res['loadavg_end']}): absolute times are noisy, the "
        f"variants were interleaved in {b['rounds']} rounds, so ratios within the run hold. Random-init "
        f"{res['arch']} text tower; graph: {res['graph']}; ORT CPU, default threads (2). "
        f"Labels: \"{res['template']}\" with short labels (size colour shape, {res['label_tokens']['min']}-"
        f"{res['label_tokens']['max']} tokens incl. SOT/EOT); the call's used length is {res['used_length']} "
        f"of {res['context_length']}.", "",
        f"**End to end (tokenize + cut + text graph, as `OnnxRuntime.encode_texts`), {res['labels']} labels:** before "
        f"(full context) {b['best_s']:.2f} s best / {b['median_s']:.2f} s median, after (used length) "
        f"{a['best_s']:.2f} s / {a['median_s']:.2f} s: **{res['speedup_best']:.1f}x** (best), "
        f"{res['speedup_median']:.1f}x (median); features max |diff| vs the full context "
        f"{a['max_abs_diff_vs_full']:.1e} (target <= 1e-5, >= 4x).", "",
        "| text graph fed L tokens | s per call (best) | s (median) | max abs diff vs full context |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        if name.startswith("graph L="):
            d = "(cuts labels)" if r["max_abs_diff_vs_full"] is None else f"{r['max_abs_diff_vs_full']:.1e}"
            lines.append(f"| {r['length']} | {r['best_s']:.2f} | {r['median_s']:.2f} | {d} |")
    lines += ["", "Label sets of growing length, end to end (after cuts to each set's longest label; before "
              "always runs the full context, so its time is the first table's, whatever the labels):", "",
              "| labels | used length | after s (best) | before s (best) | speed-up | max abs diff after vs before |",
              "|---|---|---|---|---|---|"]
    for k, n in res["set_lengths"].items():
        ra = rows[f"after, labels {k}"]
        rb = rows["before (full context)"]
        d = ra["max_abs_diff_vs_before"]
        lines.append(f"| {k} | {n} | {ra['best_s']:.2f} | {rb['best_s']:.2f} | {rb['best_s'] / ra['best_s']:.1f}x | "
                     f"{d:.1e} |")
    lines += ["", f"Graph: {res['graph']}."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
