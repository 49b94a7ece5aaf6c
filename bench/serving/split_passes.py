"""Split passes, measured: the ORT CPU runtime with each batch run as two 1-thread half passes at
once (serving/runtimes/split_pass.py) vs one pass on two intra-op threads, on the same bundles.

    python bench/serving/split_passes.py --bundle vitb32=DIR [--bundle vitb32-int8=DIR] \
        [--batches 1 2 4 8 16 32 64] [--seconds 4] [--rounds 3] [--spin 0 1] [--out bench/serving/results]

Both variants are `OnnxRuntime` objects over the same bundle (`split_passes=True/False`), 2
intra-op threads, ORT's pool spinning off (`CLIPHEADS_ORT_SPIN=0`, the service's default) or on
(ORT's default, as in batch scoring) per `--spin`. Sustained images/s: `run_path` called back to
back for `--seconds` (what an encoder under load or a scoring job does), the two variants
alternating which goes first in each round, a 0.3 s pause before each; medians over rounds, best in
brackets. Also checks that both give the same logits and features. Writes OUT/split-passes.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def sustained(rt, pixels: np.ndarray, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rt.run_path(0, pixels)
        n += len(pixels)
    return n / (time.perf_counter() - t0)


def measure(bundle: Path, batches: list[int], seconds: float, rounds: int, spin: str) -> dict:
    from clipheads.serving.runtimes import OnnxRuntime

    os.environ["CLIPHEADS_ORT_SPIN"] = spin
    os.environ["CLIPHEADS_ORT_THREADS"] = "2"
    variants = {"one pass, 2 threads": OnnxRuntime(bundle, providers=["CPUExecutionProvider"], split_passes=False),
                "split, 2 x 1 thread": OnnxRuntime(bundle, providers=["CPUExecutionProvider"], split_passes=True)}
    size = int(next(iter(variants.values())).preprocess["image_size"])
    rng = np.random.default_rng(0)
    out: dict = {}
    for b in batches:
        px = rng.integers(0, 256, (b, 3, size, size), dtype=np.uint8)
        ref = None
        for rt in variants.values():  # warm (first pass per shape allocates), and the same answers
            got = rt.run_path(0, px)
            if ref is None:
                ref = got
            diff = max(float(np.abs(a - r).max()) for a, r in zip(got, ref))
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]
            for name, rt in order:
                time.sleep(0.3)
                rates[name].append(sustained(rt, px, seconds))
        one, split = (float(np.median(v)) for v in rates.values())
        out[str(b)] = {"rates": rates, "median": {k: float(np.median(v)) for k, v in rates.items()},
                       "best": {k: float(max(v)) for k, v in rates.items()}, "split_over_one": split / one,
                       "max_abs_diff": diff}
        print(f"[split] {bundle.name} spin={spin} batch {b}: one pass {one:.2f} img/s, split {split:.2f} "
              f"({split / one:.3f}x), max diff {diff:.1e}", flush=True)
    return out


def render(res: dict) -> str:
    m = res["machine"]
    lines = ["# Split passes: two 1-thread half passes at once vs one 2-thread pass (ORT CPU runtime)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, load average {[round(x, 2) for x in m['loadavg_before']]} -> "
             f"{[round(x, 2) for x in m['loadavg_after']]}; "
             f"onnxruntime {m['onnxruntime']}. `bench/serving/split_passes.py`, {res['seconds']} s of back-to-back "
             f"`run_path` calls per variant, batch and round, {res['rounds']} rounds alternating the order; medians "
             "(best in brackets). Both variants are `OnnxRuntime` on the same bundle; the answers are compared. "
             "A batch of one is never split: its row is the same code twice, i.e. the run's noise.", ""]
    for key, by_batch in res["results"].items():
        name, spin = key.rsplit("|", 1)
        lines += [f"## {name}, ORT pool spinning {'on (ORT default, batch scoring)' if spin == '1' else 'off (the service default)'}", "",
                  "| batch | one pass, 2 threads img/s | split, 2 x 1 thread img/s | split / one | max abs diff |",
                  "|---:|---:|---:|---:|---:|"]
        for b, r in by_batch.items():
            one, split = r["median"].values()
            bo, bs = r["best"].values()
            lines.append(f"| {b} | {one:.2f} ({bo:.2f}) | {split:.2f} ({bs:.2f}) | **{r['split_over_one']:.3f}** | "
                         f"{r['max_abs_diff']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True, help="NAME=DIR (repeat)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spin", nargs="+", default=["0"], choices=["0", "1"])
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from load_test import machine

    info = machine()
    res = {"machine": info, "seconds": a.seconds, "rounds": a.rounds, "results": {}}
    for spec in a.bundle:
        name, _, path = spec.partition("=")
        for spin in a.spin:
            res["results"][f"{name}|{spin}"] = measure(Path(path), a.batches, a.seconds, a.rounds, spin)
    info["loadavg_after"] = os.getloadavg()
    info["platform"] = platform.platform()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split-passes.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "split-passes.md").write_text(render(res) + "\n")
    print(f"[split] wrote {out / 'split-passes.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
