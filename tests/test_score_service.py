"""Integration: batch scoring gives the same predictions as the real HTTP `/classify`.

A real `clipheads serve` (BentoML front + encoder) runs the same head; 48 images (PNG and JPEG,
various sizes, one grayscale, one RGBA) go through `/classify` in a few multipart requests and
through `clipheads score`; labels must be identical and scores equal to the service's 6 decimals.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_CONFIGS, make_backbone
from test_score import _flat

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parent.parent
TASKS = {"shape": ("circle", "square", "triangle", "star", "ring"), "color": ("red", "green", "blue")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(TEST_CONFIGS)
    d = tmp_path_factory.mktemp("svc-head")
    bb = make_backbone("test-vit-micro", seed=5)
    weights = d / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    bb = load_backbone("test-vit-micro", str(weights))
    return save_head(build_method("zeroshot", bb, [TaskSpec(n, c) for n, c in TASKS.items()], {}), d / "zs.head.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("svc-images")
    rng = np.random.default_rng(1)
    for i in range(48):
        w, h = (int(v) for v in rng.integers(24, 97, size=2))
        arr = np.clip(rng.integers(0, 255, 3) + rng.integers(-50, 50, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        if i == 5:
            im = im.convert("L")
        if i == 6:
            im = im.convert("RGBA")
        im.save(root / f"im{i:03d}.{'jpg' if i % 3 == 0 and i != 6 else 'png'}")
    return root


@pytest.fixture(scope="module")
def server(head_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("svc")
    port = _free_port()
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(d / "bentoml-home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    log = open(d / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipheads.serving.cli", str(head_file), "--port", str(port), "--tasks-dir", str(d / "tasks"),
         "--model-configs", str(TEST_CONFIGS)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {(d / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not ready in 180 s: {(d / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


def test_batch_scores_equal_http_classify(server, head_file, images, tmp_path):
    from clipheads.serving.scoring.cli import main

    files = sorted(p for p in images.iterdir())
    http = {}
    for a in range(0, len(files), 16):
        chunk = files[a:a + 16]
        r = httpx.post(server + "/classify", timeout=60,
                       files=[("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in chunk],
                       data={"tasks": json.dumps(list(TASKS)), "top_k": "10"})
        assert r.status_code == 200, r.text
        for p, pred in zip(chunk, r.json()["predictions"]):
            http[p.name] = pred
    out = tmp_path / "preds.parquet"
    assert main([str(head_file), "--input", str(images), "--output", str(out), "--top-k", "10", "--batch-size", "16",
                 "--no-progress"]) == 0
    rows = _flat(pq.read_table(out)).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(http)
    for r in rows:
        for task in TASKS:
            want = http[r["path"]][task]
            assert r[f"{task}.top_labels"] == [x["label"] for x in want], (r["path"], task)
            np.testing.assert_allclose(r[f"{task}.top_scores"], [x["score"] for x in want], atol=2e-6)
