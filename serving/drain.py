"""Ordered shutdown of the two serving processes (RELIABILITY.md B5 #12: after SIGTERM, the
requests already in flight finish).

BentoML stops a multi-service server by (1) deleting the directory that holds the services' unix
sockets and then (2) sending SIGTERM to every worker at once. A request the front had admitted but
not yet forwarded would then find no encoder socket to connect to, or an encoder that no longer
accepts connections, and fail with a 500 although it was in flight. Two measures close that window:

- the front reaches the encoder through a hard link to the encoder's socket, made at start-up in a
  directory of the front's own, so deleting BentoML's socket directory does not cut it off;
- the encoder defers its own shutdown until every front process that registered with it (in its
  warm-up ping) has exited, or the grace period is over, so it serves the front's drain.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlparse

from .wire import JSON

log = logging.getLogger("clipheads.serving")

SignalHandler = Callable[[int, Any], Any]


def chain_exit_signals(on_signal: Callable[[int, SignalHandler], None]) -> bool:
    """Install `on_signal(signum, previous_handler)` for SIGTERM and SIGINT. Call it at service
    start-up, i.e. inside uvicorn's own signal capture, so `previous_handler` is uvicorn's
    `handle_exit` and calling it starts uvicorn's graceful shutdown. False when not on the main
    thread (in-process test clients), where signals cannot be handled."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if not callable(prev):
            continue

        def handler(signum, frame, prev=prev):
            on_signal(signum, prev)

        try:
            signal.signal(sig, handler)
        except ValueError:
            return False
    return True


# ---- front side -----------------------------------------------------------------------------------
class PinnedSocket:
    """A hard link to a unix socket in a private directory: connecting through it reaches the same
    listening socket after the original path was deleted."""

    def __init__(self, socket_path: str):
        original = Path(socket_path)
        # same parent as BentoML's socket directory -> same file system, so link(2) works
        self.dir = Path(tempfile.mkdtemp(prefix="clipheads-link-", dir=original.parent.parent))
        self.path = self.dir / "encoder.sock"
        os.link(original, self.path)

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def pin_dependency(owner: Any, attr: str, on: Any) -> tuple[Any, Optional[PinnedSocket]]:
    """The client of `owner.<attr>` (a `bentoml.depends`), re-pointed at a pinned link to the
    dependency's unix socket when it has one. Falls back to BentoML's own client (and says so) when
    the dependency is not a local socket (a remote URL, or in-process for tests) or linking fails."""
    proxy = getattr(owner, attr)  # resolves the dependency (BentoML's RemoteProxy or an instance)
    url = getattr(vars(type(owner)).get(attr), "url", None) or ""
    # BentoML 1.4's internal-dependency client (what `bentoml.depends` builds), speaking JSON where
    # BentoML's speaks pickle (wire.py: the encoder refuses pickle)
    from _bentoml_impl.client import RemoteProxy

    if urlparse(url).scheme != "file":  # in-process (tests) as is; a remote encoder over JSON
        return (RemoteProxy(url, service=on, media_type=JSON).as_service() if url else proxy), None
    try:
        pinned = PinnedSocket(unquote(urlparse(url).path))
    except OSError as err:
        log.warning("cannot pin the %s socket (%s); a SIGTERM may fail requests not yet forwarded", attr, err)
        return RemoteProxy(url, service=on, media_type=JSON).as_service(), None
    return RemoteProxy(pinned.url, service=on, media_type=JSON).as_service(), pinned


# ---- encoder side ---------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class FrontRegistry:
    """The encoder's view of the front processes it serves, and its deferred exit."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.pids: set[int] = set()
        self._stopping = False

    def register(self, pid: int) -> None:
        if pid > 0:
            self.pids.add(pid)

    def live_fronts(self) -> list[int]:
        return [p for p in sorted(self.pids) if _alive(p)]

    def on_exit_signal(self, signum: int, prev: SignalHandler) -> None:
        if self._stopping:  # a second signal: do not wait any longer
            prev(signum, None)
            return
        self._stopping = True
        threading.Thread(target=self._exit_after_fronts, args=(signum, prev), daemon=True,
                         name="drain").start()

    def _exit_after_fronts(self, signum: int, prev: SignalHandler) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.live_fronts() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.live_fronts()
        if left:
            log.warning("grace period over; stopping with front(s) %s still running", left)
        prev(signum, None)  # uvicorn's handle_exit: finish open requests, then stop
