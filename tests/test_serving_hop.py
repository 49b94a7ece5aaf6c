"""The front -> encoder hop on a real `clipheads serve` (issue 16.7, encoder side).

* SIGKILL the encoder while requests are in flight: each of them is answered 503 `not_ready` with
  Retry-After at once (before: they hung ~8 s behind circus's listening socket until the restarted
  encoder took the connection), and the server serves again once the new encoder is warm.
* SIGTERM while requests keep arriving on open connections: every answer is a 200 or a 503 with
  Retry-After, never a 500 (a request admitted just before the signal used to find BentoML's
  encoder socket already deleted).
The encoder is wrapped by tests/fault_runtime.py: a solid image whose red channel is 3 makes its
pass sleep CLIPHEADS_FAULT_BUSY_S, so requests are in flight when the signal lands.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from test_serving import REPO, Server, make_micro_head, png
from test_serving_ops import parse_metrics, wait_ready, workers

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")

BUSY_S = 4.0
OK_IMG, BUSY_IMG = png((200, 20, 20)), png((3, 20, 20))
BIG_IMG = png((200, 20, 20), size=(1600, 1200))  # decodes for a while in the front before the encoder call


def start(d, grace: int = 5) -> Server:
    env = {"CLIPHEADS_RUNTIME_HOOK": "fault_runtime:wrap", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "CLIPHEADS_FAULT_BUSY_S": str(BUSY_S), "CLIPHEADS_TIMEOUT_S": "20"}
    return Server(make_micro_head(d), None, d / "server.log", env_extra=env, args=("--grace", str(grace)))


def files(blob: bytes):
    return [("images", ("x.png", blob, "image/png"))]


async def wait_in_flight(c: httpx.AsyncClient, n: int, within: float = 10.0) -> None:
    deadline = time.time() + within
    while time.time() < deadline:
        if parse_metrics((await c.get("/metrics")).text).get("clipheads_in_flight", 0) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{n} requests never got in flight")


def test_sigkilled_encoder_fails_in_flight_requests_fast_with_503(tmp_path):
    srv = start(tmp_path)
    try:
        encoder = workers(srv)["encoder"]

        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                async def one():
                    r = await c.post("/classify", files=files(BUSY_IMG), data={"tasks": '["color"]'})
                    return r, time.perf_counter()

                reqs = [asyncio.ensure_future(one()) for _ in range(3)]
                await wait_in_flight(c, 3)
                await asyncio.sleep(0.3)  # inside the encoder's BUSY_S pass
                encoder.kill()
                t_kill = time.perf_counter()
                return await asyncio.gather(*reqs), t_kill

        results, t_kill = asyncio.run(go())
        for r, t_done in results:
            assert r.status_code == 503, (r.status_code, r.text)
            assert r.json()["error"] == "not_ready" and r.headers.get("retry-after"), r.text
            assert t_done - t_kill < 2.5, f"answered {t_done - t_kill:.1f} s after the encoder died"
        wait_ready(srv, 90)
        assert workers(srv)["encoder"].pid != encoder.pid
        r = httpx.post(srv.url + "/classify", files=files(OK_IMG), timeout=30)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


def test_sigterm_under_arriving_requests_never_answers_500(tmp_path):
    """Requests flow one at a time (the front needs one encoder connection), then a burst of 8 is
    admitted together with the SIGTERM: their encoder calls need connections the front does not
    have yet, made while BentoML tears its sockets down."""
    srv = start(tmp_path, grace=8)
    try:
        async def go():
            statuses: list = []
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as c:
                async def one():
                    try:
                        r = await c.post("/classify", files=files(BIG_IMG), data={"tasks": '["color"]'})
                        statuses.append((r.status_code, r.headers.get("retry-after"), r.text[:200]))
                    except httpx.HTTPError as err:  # refused / closed once uvicorn stops accepting
                        statuses.append((type(err).__name__, None, ""))

                for _ in range(5):  # warm: one connection, one encoder call at a time
                    await one()
                burst = [asyncio.ensure_future(one()) for _ in range(8)]
                await asyncio.sleep(0.05)  # admitted, decoding
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*burst)
            return statuses

        statuses = asyncio.run(go())
        codes = [s[0] for s in statuses]
        assert codes[:5] == [200] * 5, statuses
        bad = [s for s in statuses if isinstance(s[0], int) and s[0] != 200 and not (s[0] == 503 and s[1])]
        assert not bad, bad
        assert srv.proc.wait(20) == 0
    finally:
        srv.stop()
