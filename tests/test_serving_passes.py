"""CLIPHEADS_ORT_PASSES=2 on a real `clipheads serve` of an exported ONNX bundle (encoder/batching.py).

A lone request runs on the runtime's two threads; a backlog queued behind a slow pass is shared by
the encoder's two runners, each half on a 1-thread session, at once. The answers must be the ones
the same images get alone, and /metrics must show the backlog as two passes, not one. The held pass
comes from tests/fault_runtime.py (a solid image whose red channel is 4 waits for a gate file, which
the test creates once /metrics shows the whole backlog queued: no timing assumptions).
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from test_serving import REPO, Server, make_micro_head, png
from test_serving_ops import delta, parse_metrics

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
pytest.importorskip("onnxruntime")

IMAGES = [png((40 + 25 * k, 200 - 20 * k, 30 + 10 * k), size=(40 + 4 * k, 36)) for k in range(8)]
HELD_IMG = png((4, 20, 20))


def classify(c, blob: bytes):
    return c.post("/classify", files=[("images", ("x.png", blob, "image/png"))], data={"top_k": "3"})


def scores(body: dict) -> dict:
    return {t: {p["label"]: p["score"] for p in ranked} for t, ranked in body["predictions"][0].items()}


def passes_started(metrics: dict) -> float:
    return metrics.get("clipheads_encoder_batch_size_count", 0.0)


async def queued(c, images: int, passes: float | None = None, within: float = 30.0) -> None:
    """Until the encoder's queue holds `images` images (and, if given, `passes` passes have started)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        m = parse_metrics((await c.get("/metrics")).text)
        if m.get("clipheads_encoder_queue_images", 0) == images and (passes is None or passes_started(m) >= passes):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the encoder never had {images} image(s) queued (passes {passes})")


def test_a_shared_backlog_runs_as_two_passes_with_the_lone_answers(tmp_path):
    from clipheads.cli import main

    head = make_micro_head(tmp_path)
    assert main(["export", str(head), "--out", str(tmp_path / "bundle"), "--probes", "8", "--json"]) == 0
    env = {"CLIPHEADS_ORT_PASSES": "2", "CLIPHEADS_ORT_THREADS": "2", "CLIPHEADS_RUNTIME_HOOK": "fault_runtime:wrap",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "CLIPHEADS_FAULT_GATE": str(tmp_path / "gate"),
           # a 0.2 s pass, as a real model's: a runner that takes half a backlog finds the other half
           # taken alongside (with the micro model's ~1 ms passes it often finished first, and the
           # next runner halved again: 4, 2, 1, 1)
           "CLIPHEADS_FAULT_PASS_S": "0.2"}
    srv = Server(tmp_path / "bundle", None, tmp_path / "server.log", env_extra=env)
    try:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                alone = []
                for blob in IMAGES:  # one at a time: each a lone pass on both threads
                    r = await classify(c, blob)
                    assert r.status_code == 200, r.text
                    alone.append(scores(r.json()))
                before = parse_metrics((await c.get("/metrics")).text)
                held = asyncio.ensure_future(classify(c, HELD_IMG))
                await queued(c, 0, passes=passes_started(before) + 1)  # its pass runs, alone
                burst = [asyncio.ensure_future(classify(c, blob)) for blob in IMAGES]
                await queued(c, len(IMAGES))  # all of them wait behind it
                (tmp_path / "gate").touch()
                answers = await asyncio.gather(held, *burst)
                after = parse_metrics((await c.get("/metrics")).text)
                return alone, answers, delta(after, before)

        alone, answers, moved = asyncio.run(go())
    finally:
        srv.stop()
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    for want, r in zip(alone, answers[1:]):
        got = scores(r.json())
        assert got.keys() == want.keys() and all(
            got[t].keys() == want[t].keys() and all(abs(got[t][k] - want[t][k]) <= 2e-6 for k in want[t]) for t in want)
    # the held pass alone, then its 8-image backlog as two passes (one pass at a time would make it one)
    assert moved.get("clipheads_encoder_batch_size_count") == 3 and moved.get("clipheads_encoder_batch_size_sum") == 9, moved
