"""A real PostgreSQL server for tests: `initdb` + `postgres` from the Debian package, on a free
loopback port, in a throwaway data directory (trust auth, fsync off: test data only).

PostgreSQL refuses to run as root; under root (CI) the server runs as the `postgres` user the
Debian package creates, in a directory that user owns.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PG_VERSION_HINT = "postgresql-15 (Debian; .ci/run installs it)"


def find_bindir() -> Optional[Path]:
    """The directory holding `initdb` and `postgres`, or None."""
    for cand in [os.environ.get("CLIPHEADS_PG_BINDIR", "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if cand and (Path(cand) / "initdb").is_file() and (Path(cand) / "postgres").is_file():
            return Path(cand)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return Path(os.path.realpath(initdb)).parent
    return None


def require_bindir() -> Path:
    """The server binaries, or skip (fail under CI=true: .ci/run installs them, a skip there would
    hide a broken install)."""
    import pytest

    bindir = find_bindir()
    if bindir is None:
        msg = f"PostgreSQL server binaries (initdb, postgres) not found; install {PG_VERSION_HINT}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    pytest.importorskip("psycopg")
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="clipheads-pg-"))
        self.data = self.dir / "data"
        self.user_kw: dict = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user_kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log = self.dir / "postgres.log"
        subprocess.run([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                        "-E", "UTF8", "--locale", "C"], check=True, capture_output=True, timeout=120, **self.user_kw)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                 "-k", str(self.dir), "-F", "-c", "max_connections=50", "-c", "shared_buffers=16MB"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self.user_kw,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import psycopg

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"postgres not ready within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class StallingProxy:
    """A TCP proxy in front of the server that can stall: `freeze()` stops moving bytes either way
    while every connection stays open (a hung database, pooler or half-dead network path, where no
    error ever comes back), `thaw()` resumes. New connections are accepted meanwhile, and stall."""

    def __init__(self, host: str, port: int):
        import threading

        self.target = (host, port)
        self.frozen = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url_for(self, url: str) -> str:
        """`url` (a postgresql:// URL of the target) through this proxy."""
        return url.replace(f":{self.target[1]}/", f":{self.port}/", 1)

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import select

        try:
            while not self._stop.is_set():
                if self.frozen.is_set() or not select.select([src], [], [], 0.05)[0]:
                    time.sleep(0.01)
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._socks:
            s.close()
