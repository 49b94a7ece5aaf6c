"""B5 #13, first half: `/readyz` is 503 (an answer, not a refused connection) until the front has
warmed up through the encoder, and requests meanwhile get 503 `not_ready`; then both turn 200.

The encoder is wrapped by tests/fault_runtime.py with CLIPHEADS_FAULT_WARM_GATE: its own warm-up
at load runs, the front's warm-up pass waits until the test creates the gate file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_serving import REPO, make_micro_head, png

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.integration


def _wait(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = cond()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s")


def test_readyz_is_503_until_the_front_has_warmed_up(tmp_path):
    from test_serving import free_port

    head, gate, port = make_micro_head(tmp_path), tmp_path / "gate", free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp_path / "bentoml"),
               CLIPHEADS_RUNTIME_HOOK="fault_runtime:wrap", CLIPHEADS_FAULT_WARM_GATE=str(gate),
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    with open(tmp_path / "server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clipheads.serving.cli", str(head), "--port", str(port),
                                 "--model-configs", str(REPO / "tests" / "model_configs")],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: httpx.get(url + "/livez", timeout=2).status_code == 200, 120, "the front answers /livez")
        held = time.time()
        while time.time() - held < 3:  # held for 3 s: every probe is an answer, and a 503
            r = httpx.get(url + "/readyz", timeout=5)
            assert r.status_code == 503, (r.status_code, r.text[:200])
            time.sleep(0.2)
        r = httpx.post(url + "/classify", files=[("images", ("a.png", png((200, 20, 20)), "image/png"))], timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "not_ready", r.text[:300]
        gate.touch()
        _wait(lambda: httpx.get(url + "/readyz", timeout=5).status_code == 200, 30, "/readyz turns 200 once warm")
        r = httpx.post(url + "/classify", files=[("images", ("a.png", png((200, 20, 20)), "image/png"))], timeout=30)
        assert r.status_code == 200 and "color" in r.json()["predictions"][0], r.text[:300]
    finally:
        gate.touch()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
