"""Where a running `clipheads serve` spends its CPU: py-spy samples of every server process under
load, grouped into named buckets.

    python bench/serving/profile_server.py --source BUNDLE [--concurrency 8] [--duration 20] \
        [--out bench/serving/profile] [--tag NAME] [--server-env KEY=VALUE ...]

py-spy (pip install py-spy; a profiling tool, not a project dependency) samples the on-CPU Python
stacks of each server process at 200 Hz while the load generator (this process) drives POST
/classify with one JPEG per request. Each sample is assigned to the first bucket whose pattern
matches a frame, scanning from the innermost frame outwards, so "decode" wins over "event loop".
Writes OUT/TAG.md (table: % of each process's samples per bucket, CPU ms per request per process)
and OUT/TAG.collapsed.<process> (raw collapsed stacks, for flame graphs).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load_test import cpu_seconds, drive, jpeg, machine, server_procs, start_server  # noqa: E402

# (bucket, regex over one frame "function (file:line)"), first match from the innermost frame wins
BUCKETS = [
    ("runtime (ORT/torch run)", r"onnxruntime|torch/nn/|InferenceSession|\brun_path\b"),
    ("image decode (Pillow)", r"PIL/|decode_image|images\.py"),
    ("pickle / serde of the hop", r"pickle|serde|_bentoml_impl/serde|numpy/core/numeric.*frombuffer"),
    ("multipart parsing", r"multipart|python_multipart|formparsers"),
    ("JSON", r"json/|orjson"),
    ("pydantic / IO validation", r"pydantic|_bentoml_sdk/io_models|_bentoml_sdk/validators"),
    ("HTTP client to the encoder (aiohttp)", r"aiohttp/|_bentoml_impl/client"),
    ("HTTP parsing + uvicorn (h11/httptools)", r"h11/|httptools|uvicorn/protocols|uvicorn/"),
    ("metrics (prometheus)", r"prometheus_client|instruments\.py|metrics\.py"),
    ("tracing (OpenTelemetry)", r"opentelemetry"),
    ("access log / logging", r"logging/|access\.py"),
    ("starlette routing/requests", r"starlette/"),
    ("BentoML request handling", r"bentoml|_bentoml_impl|_bentoml_sdk"),
    ("clipheads front/guard/encoder", r"clipheads|serving/"),
    ("asyncio event loop", r"asyncio/|selectors"),
    ("threads / futures", r"threading|concurrent/futures|queue\.py"),
]


def bucket_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, pat in BUCKETS:
            if re.search(pat, frame):
                return name
    return "other"


def summarize(collapsed: Path) -> Counter:
    c: Counter = Counter()
    for line in collapsed.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        c[bucket_of(frames[1:] if frames and frames[0].startswith(("process", "thread")) else frames)] += int(n)
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "profile"))
    ap.add_argument("--tag", default="profile")
    ap.add_argument("--server-env", nargs="*", default=[])
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="clipheads-prof-"))
    blobs = [jpeg(i) for i in range(64)]
    proc, url = start_server(args.source, args.runtime, work, args.server_env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        procs = server_procs(proc)
        asyncio.run(drive(url, blobs, args.concurrency, 3.0, None))  # warm
        spies = {}
        for role, p in procs.items():
            dest = out / f"{args.tag}.collapsed.{role}"
            spies[role] = (dest, subprocess.Popen(
                [args.py_spy, "record", "--pid", str(p.pid), "--rate", str(args.rate), "--format", "raw",
                 "--duration", str(int(args.duration)), "--output", str(dest), "--threads", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        cpu0 = cpu_seconds(procs)
        r = asyncio.run(drive(url, blobs, args.concurrency, args.duration, None))
        cpu1 = cpu_seconds(procs)
        for role, (_, sp) in spies.items():
            sp.wait(60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    n = max(1, r["requests_ok"])
    md = [f"# Server CPU profile: {args.tag}", "",
          f"Source `{Path(args.source).name}`, POST /classify with 1 JPEG (320x240) per request at concurrency "
          f"{args.concurrency} for {args.duration:g} s: {r['images_per_s']} requests/s, p50 {r['p50_ms']} ms. "
          f"Machine: {machine()['cpu']}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          "(shared: CPU time per request is the stable number).", "",
          "CPU ms per request: " + ", ".join(f"{k} {1000 * (cpu1[k] - cpu0[k]) / n:.2f}" for k in cpu1) + ".", ""]
    for role, (dest, _) in spies.items():
        c = summarize(dest)
        total = sum(c.values()) or 1
        cpu_ms = 1000 * (cpu1[role] - cpu0[role]) / n
        md += [f"## {role} ({cpu_ms:.2f} CPU ms per request, {total} samples)", "",
               "| bucket | share of samples | ~CPU ms per request |", "|---|---:|---:|"]
        md += [f"| {k} | {v / total:.1%} | {cpu_ms * v / total:.2f} |" for k, v in c.most_common()]
        md.append("")
    (out / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
