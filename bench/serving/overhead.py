"""Server overhead per request, A/B in one run: a base commit's service against the working tree's.

    python bench/serving/overhead.py --bundle tiny=DIR --bundle vitb32=DIR [--base REF] \
        [--rounds 2] [--concurrency 1 8 32] [--duration 8] [--out bench/serving/results] [--tag overhead]

Both variants serve the same bundles with the same runtime on the same machine, interleaved (each
round alternates which variant goes first), so their difference survives a shared, noisy machine.
`--base REF` is checked out with `git archive` into a temp dir and put first on PYTHONPATH (the
server runs from there); the other variant is this working tree.

Per (bundle, variant, concurrency) and round:
* images/s, p50/p99, errors, with POST /classify and one 320x240 JPEG per request, from a lean
  load generator (prebuilt HTTP/1.1 requests on keep-alive connections, ~0.1 ms of CPU per request,
  so the generator leaves the cores to the server);
* server CPU ms per request: all server processes (front, encoder, the front's decode process);
* raw runtime (this process, pre-decoded pixels, batch 32), measured right before and after each
  level: images/s and CPU ms per image, and once per round CPU ms per image at batch 1;
* overhead ms per request = server CPU per request - raw CPU per image (batch 32; the strict
  reading: the model at its cheapest);
* served/raw = served images/s / mean of the raw images/s around the level;
* the ceiling, once per round and bundle: decode + model with no HTTP on every core
  (`load_test.decode_model_ceiling`), images/s and CPU ms per image; served/ceiling, and the
  overhead over decode + model = server CPU per request - the ceiling's CPU per image (the work
  any consumer of a JPEG must do, so what is left is the server's own).
Writes OUT/TAG.json (every round) and OUT/TAG.md (medians over rounds).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from load_test import Raw, batch_stats, cpu_seconds, decode_model_ceiling, jpeg, machine, server_procs  # noqa: E402


# ---- the lean load generator ---------------------------------------------------------------------
def multipart_request(port: int, blob: bytes | list[bytes]) -> bytes:
    boundary = "clipheadsbench7f3a"
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x{i}.jpg\"\r\n"
              f"Content-Type: image/jpeg\r\n\r\n").encode() + b + b"\r\n"
             for i, b in enumerate([blob] if isinstance(blob, bytes) else blob)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"connection" and v.strip().lower() == b"close":
            close = True
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            raise RuntimeError("chunked answers are not expected from /classify")
    await reader.readexactly(length)
    if close:
        raise ConnectionResetError("server closed the connection")
    return status


async def drive(port: int, blobs: list[bytes], concurrency: int, duration: float, images_per_request: int = 1) -> dict:
    k = images_per_request
    reqs = [multipart_request(port, (blobs * k)[i:i + k] if k > 1 else blobs[i]) for i in range(len(blobs))]
    lat: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def worker(k: int):
        i = k
        conn = None
        while time.perf_counter() < stop:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            req = reqs[i % len(reqs)]
            i += concurrency
            t = time.perf_counter()
            try:
                code = await _one(*conn, req)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
                code = type(err).__name__
                conn[1].close()
                conn = None
            if code == 200:
                lat.append(time.perf_counter() - t)
            else:
                errors[str(code)] = errors.get(str(code), 0) + 1
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.zeros(1)
    return {"concurrency": concurrency, "requests_ok": len(lat), "errors": errors, "wall_s": wall,
            "images_per_request": k, "images_per_s": round(k * len(lat) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


# ---- servers ---------------------------------------------------------------------------------------
def checkout(ref: str, dest: Path) -> Path:
    """`git archive REF` into dest/src, laid out so that `import clipheads.serving` finds it first."""
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for sub in ("serving", "export", "training"):  # the editable install maps these; a plain path needs links
        (src / "clipheads" / sub).symlink_to(f"../{sub}")
    return src


def start_server(source: str, code_dir: Path | None, workdir: Path, env_extra: dict) -> tuple[subprocess.Popen, int]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", HF_HUB_OFFLINE="1", BENTOML_HOME=str(workdir / f"bh-{port}"),
               CLIPHEADS_MODEL_CONFIGS=str(REPO / "tests" / "model_configs"), CLIPHEADS_MAX_CONCURRENCY="256", **env_extra)
    cwd = REPO
    if code_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code_dir)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        cwd = code_dir
    log = open(workdir / f"server-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "clipheads.serving.cli", source, "--port", str(port)],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(400):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(f"server not ready; see {workdir}/server-{port}.log")


def all_server_cpu(procs: dict) -> float:
    c = cpu_seconds(procs)
    return sum(v for k, v in c.items() if k != "client")


def measure_variant(name, source, code_dir, raw: Raw, blobs, levels, duration, work, env: dict) -> list[dict]:
    proc, port = start_server(source, code_dir, work, env)
    url = f"http://127.0.0.1:{port}"
    out = []
    try:
        procs = server_procs(proc)
        before = raw.model_ips(min(3.0, duration))
        for c in levels:
            asyncio.run(drive(port, blobs, c, 2.0))  # warm
            b0, s0, cl0 = batch_stats(url), all_server_cpu(procs), sum(os.times()[:2])
            r = asyncio.run(drive(port, blobs, c, duration))
            b1, s1, cl1 = batch_stats(url), all_server_cpu(procs), sum(os.times()[:2])
            after = raw.model_ips(min(3.0, duration))
            n = max(1, r["requests_ok"])
            raw_cpu = float(np.mean(raw.cpu_ms_per_image[-2:]))
            r.update(variant=name, raw_images_per_s=[round(before, 1), round(after, 1)],
                     raw_cpu_ms_per_image=round(raw_cpu, 3),
                     server_cpu_ms_per_request=round(1000 * (s1 - s0) / n, 3),
                     client_cpu_ms_per_request=round(1000 * (cl1 - cl0) / n, 3),
                     mean_encoder_batch=round((b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]), 1))
            r["overhead_ms_per_request"] = round(r["server_cpu_ms_per_request"] - raw_cpu, 3)
            r["served_over_raw"] = round(r["images_per_s"] / ((before + after) / 2), 3)
            print(json.dumps(r), file=sys.stderr, flush=True)
            out.append(r)
            before = after
    finally:
        stop_server(proc)
    return out


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's session (the CLI, bentoml and its workers); SIGKILL after 60 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def raw_batch1_cpu(raw: Raw, duration: float) -> float:
    px = raw.px[:1]
    n, c0, t0 = 0, sum(os.times()[:2]), time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < duration:
        raw.rt.classify(px)
        n += 1
    return 1000 * (sum(os.times()[:2]) - c0) / n


def median(xs):
    return round(float(np.median(xs)), 3) if xs else None


def summarize(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["bundle"], r["variant"], r["concurrency"]) for r in rows},
                  key=lambda k: (k[0], k[2], k[1]))
    out = []
    for b, v, c in keys:
        rs = [r for r in rows if (r["bundle"], r["variant"], r["concurrency"]) == (b, v, c)]
        out.append({"bundle": b, "variant": v, "concurrency": c, "rounds": len(rs),
                    **{k: median([r[k] for r in rs]) for k in (
                        "images_per_s", "served_over_raw", "server_cpu_ms_per_request", "raw_cpu_ms_per_image",
                        "overhead_ms_per_request", "client_cpu_ms_per_request", "p50_ms", "p99_ms",
                        "mean_encoder_batch", "ceiling_images_per_s", "ceiling_cpu_ms_per_image",
                        "served_over_ceiling", "overhead_over_decode_ms")},
                    "raw_images_per_s": median([float(np.mean(r["raw_images_per_s"])) for r in rs]),
                    "errors": sum(sum(r["errors"].values()) for r in rs)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True, help="NAME=DIR (repeat)")
    ap.add_argument("--base", default="main", help="git ref of the 'before' service; 'tree' = this working tree "
                    "too (then the variants differ by --base-env / --env only)")
    ap.add_argument("--base-env", nargs="*", default=[], help="KEY=VALUE server settings of the 'before' variant")
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE server settings of this tree's variant")
    ap.add_argument("--base-name", default="before")
    ap.add_argument("--name", default="after", help="name of this working tree's variant")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="overhead")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("CLIPHEADS_MODEL_CONFIGS", str(REPO / "tests" / "model_configs"))
    work = Path(tempfile.mkdtemp(prefix="clipheads-overhead-"))
    base_dir = None if args.base == "tree" else checkout(args.base, work / "base")
    base_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD" if args.base == "tree" else args.base],
                                 capture_output=True, text=True).stdout.strip()
    tree_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    blobs = [jpeg(i) for i in range(64)]
    info = machine()
    envs = {args.base_name: dict(kv.split("=", 1) for kv in args.base_env), args.name: dict(kv.split("=", 1) for kv in args.env)}
    variants = [(args.base_name, base_dir), (args.name, None)]
    rows, raw1 = [], {}
    try:
        for rnd in range(args.rounds):
            for spec in args.bundle:
                bname, source = spec.split("=", 1)
                raw = Raw(source, "auto", blobs)
                raw1.setdefault(bname, []).append(round(raw_batch1_cpu(raw, 2.0), 3))
                ceil = decode_model_ceiling(source, blobs, 4.0)
                print(json.dumps({"bundle": bname, "ceiling": ceil}), file=sys.stderr, flush=True)
                order = variants if rnd % 2 == 0 else variants[::-1]
                for vname, code in order:
                    for r in measure_variant(vname, source, code, raw, blobs, args.concurrency, args.duration, work,
                                             envs[vname]):
                        r.update(ceiling_images_per_s=ceil["images_per_s"],
                                 ceiling_cpu_ms_per_image=ceil["cpu_ms_per_image"],
                                 served_over_ceiling=round(r["images_per_s"] / ceil["images_per_s"], 3),
                                 overhead_over_decode_ms=round(r["server_cpu_ms_per_request"]
                                                               - ceil["cpu_ms_per_image"], 3))
                        rows.append({**r, "bundle": bname, "round": rnd, "runtime": raw.rt.name})
                del raw
    finally:
        info["loadavg_after"] = os.getloadavg()
        shutil.rmtree(work / "base", ignore_errors=True)
    summary = summarize(rows)
    result = {"tag": args.tag, "machine": info, "base": f"{args.base} ({base_commit})", "envs": envs,
              "tree": f"{tree_commit}{' + uncommitted changes' if dirty else ''}", "rounds": args.rounds,
              "duration_s": args.duration, "note": args.note, "raw_cpu_ms_per_image_batch1": raw1,
              "request": "POST /classify, 1 JPEG 320x240 per request, all tasks, keep-alive connections",
              "summary": summary, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    md = [f"# Server overhead per request, A/B: {args.tag}", "",
          f"`{args.base_name}` = {result['base']}, `{args.name}` = working tree {result['tree']}; "
          f"{args.rounds} rounds, variants interleaved (the first variant alternates per round), "
          f"{args.duration:g} s per level; medians over rounds. Server settings: {envs}.",
          f"Machine: {info['cpu']}, {info['cores']} cores, **shared with other engineers' jobs** (load average "
          f"{info['loadavg_before'][0]:.1f} before, {info['loadavg_after'][0]:.1f} after): absolute numbers are "
          "contended; compare the variants, measured in the same minutes.",
          f"Request: {result['request']}; lean load generator in the same process as the raw runtime.",
          *([f"Note: {args.note}"] if args.note else []), "",
          "Overhead = CPU of all server processes per request - raw runtime CPU per image (batch 32). "
          f"Raw CPU per image at batch 1: {raw1}. Ceiling = decode + model on every core, no HTTP "
          "(one single-threaded runtime per core, batch 32); overhead over decode = server CPU per "
          "request - the ceiling's CPU per image.", "",
          "| bundle | c | variant | images/s | served/raw | raw images/s | server CPU ms/req | raw CPU ms/img "
          "| **overhead ms/req** | ceiling images/s | served/ceiling | ceiling CPU ms/img | **overhead over decode ms/req** "
          "| p50 ms | p99 ms | mean batch | errors |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        md.append(f"| {s['bundle']} | {s['concurrency']} | {s['variant']} | {s['images_per_s']} | "
                  f"{s['served_over_raw']:.0%} | {s['raw_images_per_s']} | {s['server_cpu_ms_per_request']} | "
                  f"{s['raw_cpu_ms_per_image']} | **{s['overhead_ms_per_request']}** | {s['ceiling_images_per_s']} | "
                  f"{s['served_over_ceiling']:.0%} | {s['ceiling_cpu_ms_per_image']} | **{s['overhead_over_decode_ms']}** | "
                  f"{s['p50_ms']} | {s['p99_ms']} | "
                  f"{s['mean_encoder_batch']} | {s['errors']} |")
    (out / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
