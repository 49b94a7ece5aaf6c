"""Soak test (RELIABILITY.md B5 #17): is memory stable and latency steady under hours of traffic?

    python bench/serving/soak.py [--source HEAD_OR_BUNDLE] [--duration 1800] [--concurrency 32]

Starts `clipheads serve` (by default on a tiny random-init head made on the spot), drives it with
`--concurrency` clients sending a mix of requests: /classify with JPEGs of four sizes (64 px to
2000 px wide), /zero_shot with label sets drawn from a pool larger than the text-embedding cache
(so the LRU keeps evicting), and now and then a few-shot task registered, used and deleted.
Every `--sample` seconds it records the resident memory (RSS) of the server's processes and the
latency percentiles of that window. After `--warmup` seconds it fits a line to the total RSS:

    pass  <=>  RSS growth over the soak (fitted slope x duration) < --max-growth-mb (50)
               and p99 of the last window <= --p99-factor (2) x p99 of the first window after warm-up

Writes JSON, Markdown and a plot (RSS and p99 over time) to --out; exits 1 on a failed check.
The nightly setting is the default 30 minutes; a 10-minute run is committed in bench/serving/soak/.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load_test import REPO, machine, make_head, server_procs, start_server  # noqa: E402

SIZES = [(64, 64), (320, 240), (1024, 768), (2000, 1500)]
WORDS = ["red", "green", "blue", "small", "large", "round", "square", "striped", "dotted", "bright",
         "dark", "shiny", "matte", "tiny", "giant", "wooden", "metal", "glass", "paper", "stone"]


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8)
    buf = io.BytesIO()  # upscaled noise: realistic JPEG sizes without megabytes of entropy
    Image.fromarray(small).resize(size).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def label_sets(n: int, seed: int = 0) -> list[list[str]]:
    """`n` distinct label sets (3-6 labels): more than the service's text cache (256) holds."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        labs = tuple(sorted(rng.sample(WORDS, rng.randint(3, 6))))
        if labs not in seen:
            seen.add(labs)
            out.append([f"a {w} thing" for w in labs])
    return out


class Traffic:
    def __init__(self, url: str, concurrency: int):
        self.url = url
        self.concurrency = concurrency
        self.blobs = [jpeg(i, SIZES[i % len(SIZES)]) for i in range(32)]
        self.labels = label_sets(400)
        self.latencies: list[tuple[float, float]] = []  # (finish time, seconds)
        self.codes: dict[str, int] = {}

    async def _one(self, c, rng: random.Random) -> None:
        blob = rng.choice(self.blobs)
        img = [("images", ("x.jpg", blob, "image/jpeg"))]
        roll = rng.random()
        if roll < 0.6:
            r = await c.post("/classify", files=img)
        elif roll < 0.97:
            r = await c.post("/zero_shot", files=img, data={"labels": json.dumps(rng.choice(self.labels))})
        else:  # register, use, delete a few-shot task
            name = f"soak-{rng.randrange(10**9)}"
            ex = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(rng.sample(self.blobs, 4))]
            r = await c.post("/tasks", files=ex, data={"name": name, "labels": '["a", "b"]',
                                                       "example_labels": '["a", "b", "a", "b"]'})
            if r.status_code == 201:
                await c.post("/classify", files=img, data={"tasks": json.dumps([name])})
                await c.delete(f"/tasks/{name}")
        key = str(r.status_code)
        self.codes[key] = self.codes.get(key, 0) + 1

    async def run(self, duration: float) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as c:
            stop = time.monotonic() + duration

            async def user(k: int):
                rng = random.Random(k)
                while time.monotonic() < stop:
                    t = time.monotonic()
                    try:
                        await self._one(c, rng)
                    except httpx.HTTPError as err:
                        self.codes[type(err).__name__] = self.codes.get(type(err).__name__, 0) + 1
                    self.latencies.append((time.monotonic(), time.monotonic() - t))

            await asyncio.gather(*(user(k) for k in range(self.concurrency)))


def rss_mb(proc) -> dict[str, float]:
    import psutil

    out = {"arbiter": psutil.Process(proc.pid).memory_info().rss / 2**20}
    for role, p in server_procs(proc).items():
        out[role] = p.memory_info().rss / 2**20
    return out


async def soak(url: str, proc, args) -> tuple[list[dict], Traffic]:
    traffic = Traffic(url, args.concurrency)
    load = asyncio.ensure_future(traffic.run(args.duration))
    samples, t0, seen = [], time.monotonic(), 0
    while not load.done():
        await asyncio.sleep(args.sample)
        now = time.monotonic()
        window = [s for _, s in traffic.latencies[seen:]]
        seen = len(traffic.latencies)
        ms = np.array(window) * 1000 if window else np.zeros(1)
        s = {"t_s": round(now - t0, 1), **{f"rss_{k}_mb": round(v, 1) for k, v in rss_mb(proc).items()},
             "requests": len(window), "p50_ms": round(float(np.percentile(ms, 50)), 1),
             "p99_ms": round(float(np.percentile(ms, 99)), 1)}
        s["rss_total_mb"] = round(sum(v for k, v in s.items() if k.startswith("rss_") and k != "rss_total_mb"), 1)
        samples.append(s)
        print(json.dumps(s), file=sys.stderr)
    await load
    return samples, traffic


def verdict(samples: list[dict], args) -> dict:
    after = [s for s in samples if s["t_s"] >= args.warmup]
    t = np.array([s["t_s"] for s in after])
    rss = np.array([s["rss_total_mb"] for s in after])
    slope = float(np.polyfit(t, rss, 1)[0]) if len(after) >= 3 else float("nan")  # MB per second
    span = float(t[-1] - t[0]) if len(after) else 0.0
    growth = slope * span
    p99_first, p99_last = after[0]["p99_ms"], after[-1]["p99_ms"]
    return {"windows_after_warmup": len(after), "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]),
            "rss_max_mb": float(rss.max()), "slope_mb_per_min": round(slope * 60, 3),
            "fitted_growth_mb": round(growth, 1), "p99_first_ms": p99_first, "p99_last_ms": p99_last,
            "memory_ok": bool(growth < args.max_growth_mb),
            "latency_ok": bool(p99_last <= args.p99_factor * p99_first)}


def plot(samples: list[dict], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, name in (("rss_total_mb", "total"), ("rss_front_mb", "front"), ("rss_encoder_mb", "encoder")):
        a.plot(t, [s.get(key, np.nan) for s in samples], label=name)
    a.axvline(warmup / 60, color="grey", ls=":", label="end of warm-up")
    a.set_ylabel("RSS (MiB)")
    a.legend()
    b.plot(t, [s["p50_ms"] for s in samples], label="p50")
    b.plot(t, [s["p99_ms"] for s in samples], label="p99")
    b.set_ylabel("latency per window (ms)")
    b.set_xlabel("minutes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", help="bundle or head (default: a random-init head on --make-head)")
    ap.add_argument("--make-head", default="test-vit-micro")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--duration", type=float, default=1800.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds before the memory fit starts")
    ap.add_argument("--max-growth-mb", type=float, default=50.0)
    ap.add_argument("--p99-factor", type=float, default=2.0)
    ap.add_argument("--out", default=str(HERE / "soak"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--server-env", nargs="*", default=[], help="KEY=VALUE for the server (e.g. LD_PRELOAD=...)")
    args = ap.parse_args(argv)
    os.environ.setdefault("CLIPHEADS_MODEL_CONFIGS", str(REPO / "tests" / "model_configs"))
    work = Path(tempfile.mkdtemp(prefix="clipheads-soak-"))
    source = args.source or str(make_head(args.make_head, work))
    info = machine()
    proc, url = start_server(source, args.runtime, work, [f"CLIPHEADS_TASKS_DIR={work / 'tasks'}", *args.server_env])
    try:
        samples, traffic = asyncio.run(soak(url, proc, args))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    info["loadavg_after"] = os.getloadavg()
    v = verdict(samples, args)
    tag = args.tag or f"soak-{Path(source).name.split('.')[0]}-{int(args.duration // 60)}min"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"tag": tag, "source": Path(source).name, "machine": info, "args": vars(args), "codes": traffic.codes,
              "requests": len(traffic.latencies), "verdict": v, "samples": samples}
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    plot(samples, args.warmup, out / f"{tag}.png")
    ok = v["memory_ok"] and v["latency_ok"]
    md = [f"# Soak: {tag}", "",
          f"Machine: {info['cpu']}, {info['cores']} cores, load average before {info['loadavg_before']} / after "
          f"{info['loadavg_after']}; bentoml {info['bentoml']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}.",
          f"Source: {Path(source).name}; {args.duration / 60:g} min at concurrency {args.concurrency}; mix: 60% /classify, "
          "37% /zero_shot over 400 label sets (text cache holds 256), 3% register + use + delete a few-shot task; "
          f"JPEGs {', '.join(f'{w}x{h}' for w, h in SIZES)}.", "",
          f"Requests: {len(traffic.latencies)}; status codes: {traffic.codes}.", "",
          "| check | value | limit | ok |", "|---|---|---|---|",
          f"| RSS growth after {args.warmup:g} s warm-up (fitted slope x time) | {v['fitted_growth_mb']} MiB "
          f"({v['slope_mb_per_min']} MiB/min; {v['rss_first_mb']:.0f} -> {v['rss_last_mb']:.0f}, max {v['rss_max_mb']:.0f}) "
          f"| < {args.max_growth_mb:g} MiB | {'yes' if v['memory_ok'] else '**no**'} |",
          f"| p99 last window vs first after warm-up | {v['p99_last_ms']} vs {v['p99_first_ms']} ms | "
          f"<= {args.p99_factor:g}x | {'yes' if v['latency_ok'] else '**no**'} |", "",
          f"![RSS and latency]({tag}.png)", ""]
    (out / f"{tag}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
