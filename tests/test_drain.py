"""serving/drain.py: the pieces of the ordered SIGTERM shutdown, on real sockets and processes
(the end-to-end property is tests/test_serving_ops.py::test_sigterm_drains_in_flight_and_exits_zero)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from clipheads.serving.drain import FrontRegistry, PinnedSocket

pytest.importorskip("psutil")


def test_pinned_socket_reaches_the_listener_after_its_directory_is_deleted():
    import tempfile
    from pathlib import Path

    # a short base (AF_UNIX paths stop at 108 bytes; pytest-xdist's tmp_path can be longer), as
    # BentoML's own socket directory under /tmp
    base = Path(tempfile.mkdtemp(prefix="chd-", dir="/tmp"))
    bento_dir = base / "bentoml-uds-x"  # what BentoML rmtree's on SIGTERM
    bento_dir.mkdir()
    path = bento_dir / "123.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    pinned = PinnedSocket(str(path))
    try:
        shutil.rmtree(bento_dir)
        with pytest.raises(OSError):  # the original path is gone ...
            socket.socket(socket.AF_UNIX).connect(str(path))
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(pinned.path))  # ... the pinned link still reaches the same listener
        client.sendall(b"ping")
        conn, _ = server.accept()
        assert conn.recv(4) == b"ping"
        assert pinned.url.startswith("file://") and pinned.url.endswith("encoder.sock")
        conn.close()
        client.close()
    finally:
        server.close()
        pinned.remove()
    assert not pinned.dir.exists()
    shutil.rmtree(base, ignore_errors=True)


def _exit_recorder():
    calls, done = [], threading.Event()

    def prev(signum, frame):
        calls.append((signum, time.monotonic()))
        done.set()

    return calls, done, prev


def test_encoder_exit_waits_for_registered_fronts():
    front = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    reg = FrontRegistry(grace_s=10)
    reg.register(front.pid)
    reg.register(0)  # "no pid" is ignored
    calls, done, prev = _exit_recorder()
    t0 = time.monotonic()
    reg.on_exit_signal(15, prev)
    assert not done.wait(0.3), "exited while a front was still running"
    front.wait()  # reaped -> gone (an unreaped zombie counts as gone too)
    assert done.wait(5)
    assert calls[0][0] == 15 and calls[0][1] - t0 >= 0.5
    assert reg.live_fronts() == []


def test_encoder_exit_is_capped_by_grace_and_a_second_signal_does_not_wait():
    front = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reg = FrontRegistry(grace_s=0.3)
        reg.register(front.pid)
        calls, done, prev = _exit_recorder()
        t0 = time.monotonic()
        reg.on_exit_signal(15, prev)
        assert done.wait(5) and 0.25 <= calls[0][1] - t0 < 3  # gave up after the grace period

        reg2 = FrontRegistry(grace_s=30)
        reg2.register(front.pid)
        calls2, done2, prev2 = _exit_recorder()
        reg2.on_exit_signal(2, prev2)
        assert not done2.wait(0.2)
        reg2.on_exit_signal(2, prev2)  # Ctrl-C twice: stop now
        assert done2.wait(1) and calls2[0][0] == 2
    finally:
        front.kill()
        front.wait()
