"""Atomic head swap under load, nightly size (RELIABILITY.md B5 #15; the short version is
tests/test_serving_reload.py).

    python bench/serving/swap.py [--rate 200] [--duration 60] [--swaps 20] [--out bench/serving/swap]

Serves head v1 on the tiny test ViT with reloads enabled, sends an open-loop stream of `--rate`
requests/s (half /classify, half /zero_shot; each leaves at its due time, or as soon as one of
`--workers` connections is free if the server falls behind; latency counts from the due time) for
`--duration` seconds, swaps the head `--swaps` times (v2, v3, v4, v1, ...: CoOp heads
with different weights, so scores tell which version computed them), then asks for a corrupt v5
near the end. Checks:

  * zero 5xx (and zero other errors) over the whole run;
  * every response's scores equal its reported `head_version`'s reference scores (no mixing);
  * versions move forward: a response's version was current at some moment while it was open;
  * the corrupt head is refused (422) and never serves; traffic after it carries the last good version.

Writes OUT/swap.json and OUT/swap.md; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from load_test import machine  # noqa: E402
from test_serving import Server  # noqa: E402
from test_serving_reload import AUTH, LABELS, PROBE, TOKEN, make_versions, reference_scores, scores  # noqa: E402


async def run(srv, versions: dict, ids: dict, rate: float, duration: float, n_swaps: int, workers: int) -> dict:
    import aiohttp  # not httpx: its connection pool costs O(connections) CPU per request, and the
    # load generator shares the machine with the server

    results: list[tuple[float, float, int, dict, float]] = []  # (sent, received, status, body, due)
    swaps: list[tuple[float, float, str]] = [(0.0, 0.0, ids["v1"])]  # (sent, done, version)
    errors: dict[str, int] = {}
    failed_swaps: list[dict] = []

    def form(i: int) -> tuple[str, aiohttp.FormData]:
        f = aiohttp.FormData()
        f.add_field("images", PROBE, filename="p.png", content_type="image/png")
        f.add_field("top_k", "10")
        if i % 2:
            return "/classify", f
        f.add_field("labels", json.dumps(LABELS))
        return "/zero_shot", f

    connector = aiohttp.TCPConnector(limit=workers + 4)
    async with aiohttp.ClientSession(srv.url, connector=connector, headers=AUTH,
                                     timeout=aiohttp.ClientTimeout(total=60)) as c:
        async def one(i: int, due: float):
            sent = time.monotonic()
            route, data = form(i)
            try:
                async with c.post(route, data=data) as r:
                    body = await r.json(content_type=None)
                results.append((sent, time.monotonic(), r.status, body, due))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1

        async def admin(source) -> tuple[int, dict]:
            async with c.post("/admin/reload", json={"source": str(source)}) as r:
                return r.status, await r.json(content_type=None)

        async def swapper(t0: float):
            order = ["v2", "v3", "v4", "v1"]
            for k in range(n_swaps):
                await asyncio.sleep(max(0.0, t0 + (k + 1) * duration / (n_swaps + 2) - time.monotonic()))
                sent = time.monotonic()
                status, body = await admin(versions[order[k % 4]])
                if status != 200:
                    failed_swaps.append({"swap": k, "status": status, "body": body})
                    continue
                swaps.append((sent, time.monotonic(), body["head_version"]))
            await asyncio.sleep(max(0.0, t0 + (n_swaps + 1) * duration / (n_swaps + 2) - time.monotonic()))
            status, body = await admin(versions["corrupt"])
            return {"status": status, "error": body.get("error"), "done": time.monotonic()}

        # Open loop without a client-side queue: request i is due at t0 + i / rate and leaves then,
        # or as soon as one of `workers` connections is free if the server is behind; latency is
        # counted from the due time (no coordinated omission).
        n = int(rate * duration)
        schedule = iter(range(n))

        async def worker():
            for i in schedule:
                due = t0 + i / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await one(i, due)

        t0 = time.monotonic()
        swap_task = asyncio.ensure_future(swapper(t0))
        await asyncio.gather(*(worker() for _ in range(workers)))
        corrupt = await swap_task
        wall = time.monotonic() - t0
    return {"results": results, "swaps": swaps, "corrupt": corrupt, "errors": errors, "wall_s": wall, "sent": n,
            "failed_swaps": failed_swaps}


def check(out: dict, reference: dict, good: set[str]) -> dict:
    results, swaps = out["results"], out["swaps"]
    codes: dict[str, int] = {}
    for _, _, status, _, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    mixed = wrong_version = 0
    for sent, received, status, body, _ in results:
        if status != 200:
            continue
        v = body.get("head_version")
        if v not in good:
            wrong_version += 1
            continue
        got = scores(body)
        if not np.allclose(list(got.values()), [reference[v][k] for k in got], atol=2e-5):
            mixed += 1
        current = [i for i, s in enumerate(swaps) if s[2] == v and s[0] <= received]
        nxt = swaps[max(current) + 1][1] if current and max(current) + 1 < len(swaps) else float("inf")
        if not current or nxt < sent:
            wrong_version += 1
    last = swaps[-1][2]
    after_corrupt = {b.get("head_version") for s, _, st, b, _ in results if st == 200 and s > out["corrupt"]["done"]}
    lat = np.array([r - due for _, r, _, _, due in results]) * 1000  # from the due time
    checks = {
        "zero errors (no 5xx, no 4xx, no transport errors)": set(codes) == {"200"} and not out["errors"],
        "scores match the reported version": mixed == 0,
        "each version current while its request was open": wrong_version == 0,
        "corrupt head refused with 422": out["corrupt"]["status"] == 422,
        "after the refusal only the last good version serves": after_corrupt <= {last},
        f"all {out['n_swaps']} swaps answered 200": not out["failed_swaps"],
    }
    swap_ms = [1000 * (d - s) for s, d, _ in swaps[1:]]
    return {"codes": codes, "errors": out["errors"], "mixed": mixed, "wrong_version": wrong_version,
            "requests": len(results), "sent": out["sent"], "achieved_rps": len(results) / out["wall_s"],
            "latency_ms": {p: float(np.percentile(lat, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
            "swap_ms": {"median": float(np.median(swap_ms)), "max": float(max(swap_ms))},
            "versions_seen": len({b.get("head_version") for _, _, st, b, _ in results if st == 200}),
            "failed_swaps": out["failed_swaps"], "checks": checks, "ok": all(checks.values())}


def write_md(report: dict, path: Path) -> None:
    r, a = report["result"], report["args"]
    m = report["machine"]
    lines = [f"# Head swap under load (B5 #15, nightly size): {'PASS' if r['ok'] else 'FAIL'}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, load before {[round(x, 2) for x in m['loadavg_before']]}; "
             f"bentoml {m['bentoml']}, torch {m['torch']}. Tiny test ViT (eager PyTorch runtime), "
             f"open loop {a['rate']} requests/s for {a['duration']} s (half /classify, half /zero_shot), "
             f"{a['swaps']} swaps v2 -> v3 -> v4 -> v1 -> ..., then a corrupt head.", "",
             f"Requests sent {r['sent']}, answered {r['requests']} ({r['achieved_rps']:.0f}/s); status codes "
             f"{r['codes']}; transport errors {r['errors'] or 'none'}. Latency p50/p95/p99 "
             f"{r['latency_ms']['p50']:.0f} / {r['latency_ms']['p95']:.0f} / {r['latency_ms']['p99']:.0f} ms. "
             f"A swap (POST /admin/reload) took {r['swap_ms']['median']:.0f} ms median, {r['swap_ms']['max']:.0f} ms max; "
             f"{r['versions_seen']} versions served."
             + (f" The service fell behind the offered rate ({r['achieved_rps']:.0f} of {a['rate']:.0f}/s: the load "
                "generator shares the machine's cores), so latency, counted from each request's due time, includes "
                "the backlog." if r["achieved_rps"] < 0.95 * a["rate"] else ""), "",
             "| check | ok |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in r["checks"].items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=64, help="client connections (most requests in flight)")
    ap.add_argument("--out", default=str(HERE / "swap"))
    ap.add_argument("--workdir", default=None, help="keep heads and the server log here (default: a temp dir)")
    args = ap.parse_args(argv)
    from clipheads.serving.encoder.heads import head_version

    with tempfile.TemporaryDirectory(prefix="clipheads-swap-") as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        versions = make_versions(d)
        ids = {n: head_version(p) for n, p in versions.items() if n not in ("corrupt", "other_tasks")}
        srv = Server(versions["v1"], d / "tasks", d / "server.log", args=("--auth-token", TOKEN, "--allow-reload"),
                     env_extra={"CLIPHEADS_MAX_CONCURRENCY": "1024"})
        try:
            reference = reference_scores(srv, versions, ids)  # ends on v1, where traffic starts
            info = machine()
            out = asyncio.run(run(srv, versions, ids, args.rate, args.duration, args.swaps, args.workers))
            out["n_swaps"] = args.swaps
            result = check(out, reference, set(ids.values()))
        finally:
            srv.stop()
    report = {"args": vars(args), "machine": info, "result": result}
    dst = Path(args.out)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "swap.json").write_text(json.dumps(report, indent=1))
    write_md(report, dst / "swap.md")
    print((dst / "swap.md").read_text())
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
