"""B5 #15 (short version) and #20: swap the served head under load on a real `clipheads serve`.

Versions v1..v4 are heads on the same tiny backbone and tasks with different weights (zero-shot,
then CoOp contexts from different seeds), so a response's scores tell which version computed them.
Under concurrent /classify and /zero_shot traffic the head is swapped repeatedly, then to a corrupt
file and to a head with another task layout: zero 5xx, every response's scores equal its reported
`head_version`'s reference scores (no mixing), versions only move forward in time, and the refused
heads never serve.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from test_serving import Server, make_micro_head, png

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")

TOKEN = "reload-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PROBE = png((30, 160, 40))
LABELS = ["a red thing", "a green thing", "a blue thing"]


def make_versions(d: Path) -> dict[str, Path]:
    """v1 (zero-shot) and v2..v4 (CoOp, seeds 2..4) on one backbone checkpoint; plus a corrupt
    copy and a head whose tasks differ."""
    import torch

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    v1 = make_micro_head(d)  # writes d/micro.safetensors (the shared backbone) and d/zs.head.safetensors
    bb = load_backbone("test-vit-micro", str(d / "micro.safetensors"))
    tasks = [TaskSpec("color", ("red", "green", "blue")), TaskSpec("shape", ("circle", "square", "triangle", "star"))]
    out = {"v1": v1}
    for seed in (2, 3, 4):
        torch.manual_seed(seed)
        head = build_method("coop", bb, tasks, {"n_ctx": 4})
        with torch.no_grad():
            for p in head.trainable_parameters():
                p.normal_(0, 0.5)  # clearly different class matrices per version
        out[f"v{seed}"] = save_head(head, d / f"coop{seed}.head.safetensors")
    blob = out["v2"].read_bytes()
    (d / "corrupt.head.safetensors").write_bytes(blob[: len(blob) // 2])
    out["corrupt"] = d / "corrupt.head.safetensors"
    out["other_tasks"] = save_head(build_method("zeroshot", bb, tasks[:1], {}), d / "other.head.safetensors")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("reload")
    versions = make_versions(d)
    srv = Server(versions["v1"], d / "tasks", d / "server.log",
                 args=("--auth-token", TOKEN, "--allow-reload"))
    yield srv, versions
    srv.stop()


def reload(srv, source, timeout=60) -> httpx.Response:
    return httpx.post(srv.url + "/admin/reload", json={"source": str(source)}, headers=AUTH, timeout=timeout)


def classify(client_or_module, srv, **kw):
    return client_or_module.post(srv.url + "/classify", files=[("images", ("p.png", PROBE, "image/png"))],
                                 data={"top_k": "10"}, headers=AUTH, timeout=30, **kw)


def zero_shot(client_or_module, srv, **kw):
    return client_or_module.post(srv.url + "/zero_shot", files=[("images", ("p.png", PROBE, "image/png"))],
                                 data={"labels": json.dumps(LABELS), "top_k": "10"}, headers=AUTH, timeout=30, **kw)


def scores(body: dict) -> dict[str, float]:
    """{task/label: score} of the one image in a response."""
    pred = body["predictions"][0]
    if isinstance(pred, list):  # zero-shot: a ranked list
        return {f"zs/{p['label']}": p["score"] for p in pred}
    return {f"{task}/{p['label']}": p["score"] for task, ranked in pred.items() for p in ranked}


def reference_scores(srv, versions: dict, ids: dict) -> dict[str, dict[str, float]]:
    """{version: {task/label: score}} of v2, v3, v4, v1, each served alone (ends on v1)."""
    reference: dict[str, dict[str, float]] = {}
    for name in ("v2", "v3", "v4", "v1"):
        r = reload(srv, versions[name])
        assert r.status_code == 200, r.text
        assert r.json()["head_version"] == ids[name]
        c, z = classify(httpx, srv), zero_shot(httpx, srv)
        assert c.json()["head_version"] == z.json()["head_version"] == ids[name]
        reference[ids[name]] = {**scores(c.json()), **scores(z.json())}
    return reference


def test_admin_route_needs_the_token(served):
    srv, versions = served
    r = httpx.post(srv.url + "/admin/reload", json={"source": str(versions["v2"])}, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_reload_refuses_sources_outside_the_root_and_unknown_tags(served, tmp_path):
    srv, versions = served
    outside = tmp_path / "x.head.safetensors"
    outside.write_bytes(versions["v2"].read_bytes())
    for src in (outside, "/etc/passwd", str(versions["v1"].parent / ".." / ".." / "etc"), "no-such-model:v9"):
        r = reload(srv, src)
        assert r.status_code == 422, (src, r.text)
        assert r.json()["error"] in ("source_not_allowed", "unknown_source")
    assert reload(srv, "a\x00b").status_code == 422


def test_swap_under_load_is_atomic_and_refused_heads_never_serve(served):
    srv, versions = served
    from clipheads.serving.encoder.heads import head_version

    ids = {name: head_version(p) for name, p in versions.items() if name not in ("corrupt", "other_tasks")}
    assert len(set(ids.values())) == 4

    reference = reference_scores(srv, versions, ids)  # every version, each measured alone
    assert len({json.dumps(v, sort_keys=True) for v in reference.values()}) == 4, "versions must score differently"

    # swaps under load: (request sent, response received, version) per swap
    swaps: list[tuple[float, float, str]] = [(0.0, 0.0, ids["v1"])]
    results: list[tuple[float, float, int, dict]] = []
    stop = asyncio.Event()

    async def user(c: httpx.AsyncClient, i: int):
        while not stop.is_set():
            t0 = time.monotonic()
            r = await (classify if i % 2 else zero_shot)(c, srv)
            results.append((t0, time.monotonic(), r.status_code, r.json()))

    async def swapper(c: httpx.AsyncClient):
        order = ["v2", "v3", "v4", "v1"] * 3
        refused = []
        for name in order:
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            r = await c.post(srv.url + "/admin/reload", json={"source": str(versions[name])}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            swaps.append((t0, time.monotonic(), r.json()["head_version"]))
        for name, code in (("corrupt", 422), ("other_tasks", 409)):
            r = await c.post(srv.url + "/admin/reload", json={"source": str(versions[name])}, headers=AUTH, timeout=60)
            refused.append((r.status_code, r.json()["error"]))
            assert r.status_code == code, r.text
        await asyncio.sleep(0.5)  # the refused heads never serve: traffic goes on with the last good one
        stop.set()
        return refused

    async def go():
        async with httpx.AsyncClient() as c:
            users = [asyncio.ensure_future(user(c, i)) for i in range(6)]
            refused = await swapper(c)
            await asyncio.gather(*users)
            return refused

    refused = asyncio.run(go())
    assert refused == [(422, "head_load_failed"), (409, "incompatible_head")]
    assert len(swaps) == 13 and len(results) >= 30, (len(swaps), len(results))
    assert [r[2] for r in results] == [200] * len(results), [r[3] for r in results if r[2] != 200][:3]
    good = set(ids.values())
    assert len({body["head_version"] for *_, body in results}) == 4, "traffic should have seen every version"
    for sent, received, _, body in results:
        v = body["head_version"]
        assert v in good
        got = scores(body)
        want = {k: reference[v][k] for k in got}
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=2e-5, err_msg=v)
        # the version was current at some moment while the request was open: its swap was sent
        # before the response came back, and the swap after it had not finished before the request
        k = max(i for i, s in enumerate(swaps) if s[2] == v and s[0] <= received)
        nxt = swaps[k + 1][1] if k + 1 < len(swaps) else float("inf")
        assert nxt >= sent, (v, sent, received, swaps)
    last = swaps[-1][2]
    assert {body["head_version"] for s, _, _, body in results if s > swaps[-1][1]} <= {last}

    after = classify(httpx, srv)
    assert after.status_code == 200 and after.json()["head_version"] == last
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    assert f'clipheads_head_info{{version="{last}"}} 1.0' in metrics
    assert 'clipheads_head_load_failures_total{reason="head_load_failed"} 1.0' in metrics
    assert 'clipheads_head_load_failures_total{reason="incompatible_head"} 1.0' in metrics
