"""Fault injection for the serving tests (loaded by the encoder via CLIPHEADS_RUNTIME_HOOK).

Triggers ride on ordinary requests: a solid-colour image whose red channel is
  1 -> the runtime raises RuntimeError with an internal-looking path (crash isolation, B5 #14);
  2 -> the pass sleeps SLOW_S (timeouts, B5 #10);
  3 -> the pass sleeps BUSY_S (in-flight work for drain / overload / batching tests);
  4 -> the pass waits until the file CLIPHEADS_FAULT_GATE exists (at most 60 s): a test holds it.
Every other image runs the real runtime unchanged, after CLIPHEADS_FAULT_PASS_S (default 0) of
sleep per pass: a micro model's pass then lasts as long as a real one's.
With CLIPHEADS_FAULT_WARM_GATE set, a pass of the front's warm-up image (every pixel 127) waits until
that file exists (at most 60 s): the encoder is up, the front's warm-up is held (readiness tests).
The encoder's own warm-up at load (the same image, `warmup`) is not held.
"""
from __future__ import annotations

import os
import time

import numpy as np

RAISE, SLOW, BUSY, GATED = 1, 2, 3, 4
SLOW_S = float(os.environ.get("CLIPHEADS_FAULT_SLOW_S", "3.0"))
BUSY_S = float(os.environ.get("CLIPHEADS_FAULT_BUSY_S", "0.8"))
GATE = os.environ.get("CLIPHEADS_FAULT_GATE", "")
PASS_S = float(os.environ.get("CLIPHEADS_FAULT_PASS_S", "0"))
WARM_GATE = os.environ.get("CLIPHEADS_FAULT_WARM_GATE", "")
WARM_PIXEL = 127  # runtimes/base.py warmup and front/core.py _warm both send a (1, 3, S, S) image of 127s


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


class FaultRuntime:
    def __init__(self, inner):
        self._inner = inner
        self._own_warmup = False

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False):
        marks = set(int(v) for v in np.asarray(pixels)[:, 0, 0, 0])
        if RAISE in marks:
            raise RuntimeError("/secret/path/shm_region_x exploded")
        if SLOW in marks:
            time.sleep(SLOW_S)
        elif BUSY in marks:
            time.sleep(BUSY_S)
        elif GATED in marks and GATE:
            _wait_for(GATE)
        elif WARM_GATE and not self._own_warmup and len(pixels) == 1 and (np.asarray(pixels) == WARM_PIXEL).all():
            _wait_for(WARM_GATE)
        if PASS_S:
            time.sleep(PASS_S)
        return self._inner.run_path(path, pixels, alongside=alongside)

    def warmup(self) -> None:  # the base class's warm-up calls self.run_path: keep it on the proxy
        self._own_warmup = True
        try:
            type(self._inner).warmup(self)
        finally:
            self._own_warmup = False


def wrap(runtime):
    return FaultRuntime(runtime)
