"""Load test: the running HTTP service vs the raw runtime, in one run, on the same machine.

    python bench/serving/load_test.py --source HEAD_OR_BUNDLE [--arch test-vit-micro] \
        [--concurrency 1 8 32] [--duration 10] [--out bench/serving/results]

`--source` may be omitted with `--make-head ARCH`: a zero-shot head on ARCH with random weights is
written to a temp dir (speed only: labels are meaningless). The script measures
1. raw runtime images/s (pixels already decoded, batch 32, no HTTP) and raw decode+runtime;
2. starts `clipheads serve` on a free loopback port (or uses --url) and drives POST /classify with
   one JPEG per request at each concurrency, recording images/s and p50/p95/p99 latency.
Writes JSON and Markdown (machine details included) to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_head(arch: str, out: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    if arch not in open_clip.list_models():
        open_clip.add_model_config(REPO / "tests" / "model_configs")
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    ckpt = out / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    bb = load_backbone(arch, str(ckpt), act="gelu")  # open_clip built it with GELU
    tasks = [TaskSpec("color", ("red", "green", "blue")), TaskSpec("shape", ("circle", "square", "triangle", "star"))]
    return save_head(build_method("zeroshot", bb, tasks, {}), out / f"{arch}.head.safetensors")


def jpeg(seed: int, size=(320, 240)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


class Raw:
    """The runtime in this process, no HTTP: images/s on pre-decoded pixels (batch 32), measured
    right before and after every service level so both see the same machine load."""

    def __init__(self, source: str, runtime: str, blobs: list[bytes]):
        from clipheads.serving.images import DecodeSpec, decode_image
        from clipheads.serving.runtimes import open_runtime, register_extra_model_configs

        register_extra_model_configs()
        # its best throughput in one process: one intra-op thread per core even for a small graph
        # (which a server gives one thread); set only while opening, the servers must not inherit it
        before = os.environ.get("CLIPHEADS_ORT_THREADS")
        os.environ["CLIPHEADS_ORT_THREADS"] = before or str(os.cpu_count() or 1)
        try:
            self.rt = open_runtime(source, runtime)
        finally:
            if before is None:
                del os.environ["CLIPHEADS_ORT_THREADS"]
        self.spec = DecodeSpec.from_preprocess(self.rt.preprocess)
        self.blobs = blobs[:32]
        self.decode = lambda: np.stack([decode_image(b, self.spec) for b in self.blobs])
        self.px = self.decode()
        self.cpu_ms_per_image: list[float] = []  # CPU time per image of each model_ips run
        self.rt.classify(self.px)

    def model_ips(self, duration: float) -> float:
        n, t0, c0 = 0, time.perf_counter(), sum(os.times()[:2])
        while n == 0 or time.perf_counter() - t0 < duration:
            self.rt.classify(self.px)
            n += len(self.px)
        self.cpu_ms_per_image.append(1000 * (sum(os.times()[:2]) - c0) / n)
        return n / (time.perf_counter() - t0)

    def decode_plus_model_ips(self, duration: float) -> float:
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < duration:
            self.rt.classify(self.decode())
            n += len(self.px)
        return n / (time.perf_counter() - t0)


def _ceiling_worker(args) -> tuple[int, float, float]:
    source, blobs, duration = args
    os.environ["CLIPHEADS_ORT_THREADS"], os.environ["CLIPHEADS_ORT_SPIN"] = "1", "0"  # one core each
    os.environ["OMP_NUM_THREADS"] = "1"
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import open_runtime, register_extra_model_configs

    register_extra_model_configs()
    rt = open_runtime(source, "auto")
    spec = DecodeSpec.from_preprocess(rt.preprocess)
    rt.classify(np.stack([decode_image(b, spec) for b in blobs]))  # warm
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - t0 < duration:
        rt.classify(np.stack([decode_image(b, spec) for b in blobs]))
        n += len(blobs)
    return n, time.perf_counter() - t0, time.process_time() - c0


def decode_model_ceiling(source: str, blobs: list[bytes], duration: float, processes: int | None = None) -> dict:
    """The most a server could do without HTTP: every core decoding the same JPEGs and running the
    model on them (batch 32, one single-threaded runtime per core, in separate processes so nothing
    shares a GIL). Served images/s cannot exceed this on the same machine; the load generator's
    own CPU comes on top."""
    import multiprocessing

    k = processes or os.cpu_count() or 1
    with multiprocessing.get_context("spawn").Pool(k) as pool:
        res = pool.map(_ceiling_worker, [(source, blobs[:32], duration)] * k)
    n = sum(r[0] for r in res)
    return {"images_per_s": round(n / max(r[1] for r in res), 1),
            "cpu_ms_per_image": round(1000 * sum(r[2] for r in res) / n, 3), "processes": k}


def server_procs(proc) -> dict:
    """{'front': psutil.Process, 'encoder': ..., 'front_child_<pid>': ...} of a `clipheads serve`
    started by this script. The two BentoML workers are children of `bentoml serve`; processes
    they start themselves (the front's large-image decode lane) inherit their command line and are
    listed as their children, so every server process's CPU is counted once."""
    import psutil

    out = {}
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    pids = {p.pid for p in workers}
    for p in workers:
        role = "encoder" if "clipheads_encoder" in " ".join(p.cmdline()) else "front"
        name = role if p.ppid() not in pids else f"{role}_child_{p.pid}"
        out[name if name not in out else f"{name}_{p.pid}"] = p  # several front workers: each counted
    return out


def cpu_seconds(procs: dict) -> dict:
    out = {}
    for k, p in procs.items():
        t = p.cpu_times()
        out[k] = t.user + t.system
    t = os.times()
    out["client"] = t.user + t.system
    return out


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the encoder's batch-size histogram (ours; BentoML's adaptive one before)."""
    import httpx

    s = c = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(("clipheads_encoder_batch_size_sum", "bentoml_service_adaptive_batch_size_sum")):
            s += float(line.rsplit(" ", 1)[1])
        elif line.startswith(("clipheads_encoder_batch_size_count", "bentoml_service_adaptive_batch_size_count")):
            c += float(line.rsplit(" ", 1)[1])
    return s, c


async def drive(url: str, blobs: list[bytes], concurrency: int, duration: float, token: str | None) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as c:
        stop = time.perf_counter() + duration

        async def worker(k: int):
            i = k
            while time.perf_counter() < stop:
                b = blobs[i % len(blobs)]
                i += concurrency
                t = time.perf_counter()
                try:
                    r = await c.post("/classify", files=[("images", ("x.jpg", b, "image/jpeg"))])
                    code = r.status_code
                except httpx.HTTPError as err:
                    code = type(err).__name__
                if code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[str(code)] = errors.get(str(code), 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.zeros(1)
    return {"concurrency": concurrency, "requests_ok": len(lat), "errors": errors,
            "images_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def start_server(source: str, runtime: str, workdir: Path, extra_env: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(workdir / "bentoml-home"),
               CLIPHEADS_MODEL_CONFIGS=str(REPO / "tests" / "model_configs"), CLIPHEADS_MAX_CONCURRENCY="256")
    env.update(kv.split("=", 1) for kv in extra_env)
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "clipheads.serving.cli", source, "--port", str(port), "--runtime", runtime],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(f"server not ready; see {workdir / 'server.log'}")


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    import bentoml

    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_before": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "bentoml": bentoml.__version__,
            "platform": platform.platform()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source")
    ap.add_argument("--make-head", default="test-vit-micro")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--url", help="use an already running service instead of starting one")
    ap.add_argument("--token")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "serving" / "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--note", default="", help="free text recorded with the results")
    ap.add_argument("--server-env", nargs="*", default=[], help="KEY=VALUE settings for the server (CLIPHEADS_*)")
    args = ap.parse_args(argv)
    os.environ.setdefault("CLIPHEADS_MODEL_CONFIGS", str(REPO / "tests" / "model_configs"))
    work = Path(tempfile.mkdtemp(prefix="clipheads-load-"))
    source = args.source or str(make_head(args.make_head, work))
    blobs = [jpeg(i) for i in range(64)]
    info = machine()
    print("raw runtime ...", file=sys.stderr)
    raw = Raw(source, args.runtime, blobs)
    raw_decode = raw.decode_plus_model_ips(args.duration)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(source, args.runtime, work, args.server_env)
    procs = server_procs(proc) if proc is not None else {}
    levels = []
    raw_runs = [raw.model_ips(args.duration)]
    try:
        for c in args.concurrency:
            asyncio.run(drive(url, blobs, c, min(3.0, args.duration), args.token))  # warm
            b0, cpu0, t0 = batch_stats(url), cpu_seconds(procs), time.perf_counter()
            r = asyncio.run(drive(url, blobs, c, args.duration, args.token))
            wall = time.perf_counter() - t0
            b1, cpu1 = batch_stats(url), cpu_seconds(procs)
            raw_runs.append(raw.model_ips(args.duration))
            ref = (raw_runs[-2] + raw_runs[-1]) / 2
            r["raw_before_after"] = [round(raw_runs[-2], 1), round(raw_runs[-1], 1)]
            r["fraction_of_raw"] = round(r["images_per_s"] / ref, 3)
            r["fraction_of_raw_decode"] = round(r["images_per_s"] / raw_decode, 3)
            raw_cpu = (raw.cpu_ms_per_image[-2] + raw.cpu_ms_per_image[-1]) / 2
            svc_cpu = 1000 * ((cpu1.get("front", 0) - cpu0.get("front", 0)) + (cpu1.get("encoder", 0) - cpu0.get("encoder", 0))) / max(1, r["requests_ok"])
            r["cpu_efficiency_vs_raw"] = round(raw_cpu / svc_cpu, 3) if procs and svc_cpu else None
            r["mean_encoder_batch"] = round((b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]), 1)
            n = max(1, r["requests_ok"])
            r["cpu_ms_per_image"] = {k: round(1000 * (cpu1[k] - cpu0[k]) / n, 2) for k in cpu1}
            r["cpu_busy_fraction_of_2_cores"] = round(sum(cpu1[k] - cpu0[k] for k in cpu1) / (wall * (os.cpu_count() or 1)), 2)
            levels.append(r)
            print(json.dumps(r), file=sys.stderr)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    info["loadavg_after"] = os.getloadavg()
    raw_summary = {"runtime": raw.rt.name, "batch": 32, "images_per_s_runs": [round(x, 1) for x in raw_runs],
                   "images_per_s": round(float(np.mean(raw_runs)), 1),
                   "cpu_ms_per_image_runs": [round(x, 1) for x in raw.cpu_ms_per_image],
                   "decode_plus_runtime_images_per_s": round(raw_decode, 1)}
    tag = args.tag or (Path(source).name.split(".")[0] + f"-{raw.rt.name}")
    result = {"tag": tag, "source": Path(source).name, "machine": info, "raw": raw_summary, "service": levels,
              "server_env": args.server_env, "note": args.note,
              "request": "POST /classify, 1 JPEG 320x240 per request, all tasks", "duration_s": args.duration}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    md = [f"# Serving load test: {tag}", "",
          f"Machine: {info['cpu']}, {info['cores']} cores; load average before {info['loadavg_before']}, after "
          f"{info['loadavg_after']} (shared with other jobs: numbers are contended).",
          f"Versions: python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}, bentoml {info['bentoml']}.",
          f"Request: {result['request']}; {args.duration:g} s per level. Server env: {args.server_env or 'defaults'}.",
          *( [f"Note: {args.note}"] if args.note else []), "",
          f"Raw runtime ({raw.rt.name}, batch 32, pre-decoded pixels, no HTTP), measured before the first level "
          f"and after each one: {raw_summary['images_per_s_runs']} images/s; with JPEG decode+resize in the loop: "
          f"{raw_summary['decode_plus_runtime_images_per_s']} images/s. Each level is compared with the mean of "
          "the raw runs just before and after it.", "",
          f"Raw CPU ms per image (process CPU time / images, batch 32): {raw_summary['cpu_ms_per_image_runs']}. "
          "'CPU efficiency' = raw CPU ms/image / (front + encoder CPU ms/image): the share of the raw runtime's "
          "images per CPU-second the service reaches, which contention from other jobs distorts far less than images/s.", "",
          "| concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | raw before/after | **vs raw** | vs raw decode+runtime "
          "| CPU efficiency | mean encoder batch | CPU ms/image front / encoder / client | CPU busy (of all cores) |",
          "|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for r in levels:
        cpu = r["cpu_ms_per_image"]
        md.append(f"| {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                  f"{r['errors'] or '-'} | {r['raw_before_after']} | **{r['fraction_of_raw']:.0%}** | "
                  f"{r['fraction_of_raw_decode']:.0%} | "
                  f"{'-' if r['cpu_efficiency_vs_raw'] is None else format(r['cpu_efficiency_vs_raw'], '.0%')} | {r['mean_encoder_batch']} | "
                  f"{cpu.get('front', '-')} / {cpu.get('encoder', '-')} / {cpu['client']} | {r['cpu_busy_fraction_of_2_cores']:.0%} |")
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
