"""The encoder alone, no HTTP: CPU per request of its hop + batcher + runtime, A/B in one run.

    python bench/serving/encoder_hop.py --bundle DIR [--asyncio-ref d9eb801] [--requests 3000] \
        [--concurrency 1 8] [--rounds 4] [--out bench/serving/results] [--tag encoder-hop]

Each variant runs in a child process of its own (the real `HopServer` + `ContinuousBatcher` over
the bundle's runtime); this process is the front: one `HopClient` sending 1-image frames, `c` at a
time. Reported per round: the child's CPU ms per request (utime + stime from /proc), requests/s
and p50 latency. `--asyncio-ref REF` adds the asyncio hop and batcher of that commit (before the
threaded ones; their files are taken with `git show`, relative imports made absolute), and the
variants alternate which goes first in each round. The front's side (`HopClient`) is this tree's
for both, so the difference is the encoder's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _old_modules(ref: str) -> str:
    """hop.py and encoder/batching.py of `ref` as top-level modules `old_hop`, `old_batching`."""
    out = Path(tempfile.mkdtemp(prefix="encoder-hop-"))
    for path, name in (("serving/hop.py", "old_hop"), ("serving/encoder/batching.py", "old_batching")):
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], check=True,
                             capture_output=True, text=True).stdout
        src = re.sub(r"from \.\.(\w+)", r"from clipheads.serving.\1", src)
        src = re.sub(r"from \.(\w+)", r"from clipheads.serving.encoder.\1", src)
        (out / f"{name}.py").write_text(src)
    return str(out)


def _serve(variant: str, bundle: str, old_dir: str, q) -> None:
    os.environ.setdefault("CLIPHEADS_ORT_SPIN", "0")  # as the Encoder service sets it
    from clipheads.serving.encoder.heads import HeadSlot, load_head

    slot = HeadSlot(load_head(bundle, "auto", None, warm=True), None)
    if variant == "asyncio":
        sys.path.insert(0, old_dir)
        import old_batching
        import old_hop

        batcher = old_batching.ContinuousBatcher(slot, 64, 0)

        async def run() -> None:
            q.put(await old_hop.HopServer(batcher.submit, max_images=64).start())
            await asyncio.Event().wait()

        asyncio.run(run())
    from clipheads.serving import hop
    from clipheads.serving.encoder.batching import ContinuousBatcher

    q.put(hop.HopServer(ContinuousBatcher(slot, 64, 0), max_images=64).start())
    while True:
        time.sleep(3600)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(path: str, pid: int, size: int, requests: int, concurrency: int) -> dict:
    from clipheads.serving import hop

    client = hop.HopClient()
    client.point_to(path)
    px = np.random.default_rng(0).integers(0, 255, (1, 3, size, size), dtype=np.uint8)
    for _ in range(5):  # connect, warm the pass
        await client.encode(px, [0], 0.0)
    lat: list[float] = []

    async def worker() -> None:
        for _ in range(requests // concurrency):
            t = time.perf_counter()
            await client.encode(px, [0], 0.0)
            lat.append(time.perf_counter() - t)

    c0, t0 = _cpu_s(pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, used = time.perf_counter() - t0, _cpu_s(pid) - c0
    await client.close()
    return {"encoder_cpu_ms_per_request": round(used / len(lat) * 1e3, 3),
            "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(statistics.median(lat) * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--asyncio-ref", default="")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "bench/serving/results"))
    ap.add_argument("--tag", default="encoder-hop")
    args = ap.parse_args()
    size = json.loads((Path(args.bundle) / "manifest.json").read_text())["preprocess"]["image_size"]
    variants = ["asyncio", "threads"] if args.asyncio_ref else ["threads"]
    old_dir = _old_modules(args.asyncio_ref) if args.asyncio_ref else ""
    info = {"tag": args.tag, "machine": machine(), "bundle": Path(args.bundle).name, "asyncio_ref": args.asyncio_ref,
            "requests": args.requests, "rounds": args.rounds, "rows": []}
    ctx = mp.get_context("spawn")
    for r in range(args.rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            q = ctx.Queue()
            proc = ctx.Process(target=_serve, args=(variant, args.bundle, old_dir, q), daemon=True)
            proc.start()
            try:
                path = q.get(timeout=300)
                for c in args.concurrency:
                    row = {"round": r, "variant": variant, "concurrency": c,
                           **asyncio.run(_drive(path, proc.pid, size, args.requests, c))}
                    info["rows"].append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.kill()
                proc.join()
    info["machine"]["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(info, indent=1))
    lines = [f"# Encoder alone (hop + batcher + runtime, no HTTP): {args.tag}", "",
             f"Bundle `{info['bundle']}`, 1-image frames from one HopClient, {args.requests} requests per level, "
             f"{args.rounds} rounds, variants alternating first. `asyncio` = the hop and batcher of "
             f"{args.asyncio_ref or '-'}; `threads` = this tree. Machine: {info['machine']['cpu']}, "
             f"{info['machine']['cores']} cores, load average {info['machine']['loadavg_before'][0]:.1f} before, "
             f"{info['machine']['loadavg_after'][0]:.1f} after. Medians over rounds (every round in the JSON).", "",
             "| c | variant | encoder CPU ms/request | per round | requests/s | p50 ms |", "|---:|---|---:|---|---:|---:|"]
    for c in args.concurrency:
        for v in variants:
            rows = [x for x in info["rows"] if x["variant"] == v and x["concurrency"] == c]
            med = {k: statistics.median(x[k] for x in rows) for k in ("encoder_cpu_ms_per_request", "requests_per_s", "p50_ms")}
            per = " / ".join(f"{x['encoder_cpu_ms_per_request']:.2f}" for x in rows)
            lines.append(f"| {c} | {v} | **{med['encoder_cpu_ms_per_request']:.3f}** | {per} | "
                         f"{med['requests_per_s']:.1f} | {med['p50_ms']:.2f} |")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
