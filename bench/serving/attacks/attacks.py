"""Attack figures (issue 16 must-show): a good client's latency while the service is attacked,
the hostile-input table, and the two-replica task-store check.

    python bench/serving/attacks/attacks.py [--phase-s 20] [--only slow_body,decode,hostile,replicas]
        [--out bench/serving/attacks]

Starts `clipheads serve` of a zero-shot head on the tiny test ViT (random weights, default limits)
on a free loopback port. A good client sends one 4 KB PNG per POST /classify back to back; each
attack phase is preceded by its own unattacked baseline (the machine is shared, so ratios are
taken within a pair):
- slow_body_64 / slow_body_256: N connections send headers with `Content-Length: 100000` and one
  byte of body, then hold the connection open (dribbling a byte every 2 s);
- decode_32x / decode_1x: 4 attacker threads send JSON bodies of 38-byte lossless WebPs of
  16383x2400 (39.3 MP each, just under the per-image cap): 32 per request, or 1 per request;
- control_flood_400: the same 4 threads sending a 1.8 KB body refused at once (bad JSON): what a
  request flood alone costs the good client on these 2 cores (the attacker runs on them too);
Target: good p99 <= 2x its unattacked p99, and no good request refused.
hostile: ~60 hostile requests, each followed by a good request; counted as JSON 4xx
({"error","detail"} body) or other (plain text, 5xx, hang), and whether the good request after it
was served. replicas: two `clipheads serve` on one PostgreSQL server (tests/pg_server.py): time
from a 201 on A to a 200 on B, time from a delete on A to 422 on B, and 20 concurrent same-name
registration rounds. Results: attacks.json + README.md in --out. All traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


# ---- the server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, head: Path, work: Path, name: str, args: tuple = (), env: dict | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"{name}.log"
        e = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(work / f"bentoml-{name}"),
                 PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env or {}))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipheads.serving.cli", str(head), "--port", str(self.port),
             "--model-configs", str(REPO / "tests" / "model_configs"), *args],
            cwd=REPO, env=e, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready; see {self.log_path}")

    def rss_mib(self) -> float:
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
            return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)
        except psutil.Error:
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


def png(color=(200, 30, 30), size=(48, 40)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


GOOD = png()


def webp_bomb() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16383, 2400), (9, 9, 9)).save(buf, "WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


# ---- the good client ----------------------------------------------------------------------------
class GoodClient:
    """Back-to-back POST /classify of one small PNG; latency of every request, status counts."""

    def __init__(self, url: str):
        self.url = url
        self.lat: list[float] = []
        self.codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post(self.url + "/classify", files=[("images", ("g.png", GOOD, "image/png"))],
                               data={"tasks": '["color"]'})
                    code = str(r.status_code)
                except httpx.HTTPError as err:
                    code = type(err).__name__
                dt = time.perf_counter() - t0
                self.codes[code] = self.codes.get(code, 0) + 1
                if code == "200":
                    self.lat.append(dt)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(70)

    def summary(self) -> dict:
        a = np.asarray(self.lat) * 1000
        n = sum(self.codes.values())
        return {"requests": n, "codes": self.codes, "ok_share": round(self.codes.get("200", 0) / max(1, n), 4),
                "p50_ms": round(float(np.percentile(a, 50)), 1) if len(a) else None,
                "p99_ms": round(float(np.percentile(a, 99)), 1) if len(a) else None,
                "max_ms": round(float(a.max()), 1) if len(a) else None}


# ---- attacks --------------------------------------------------------------------------------------
class SlowBodies:
    """N connections that announce a 100 kB body, send one byte and then dribble a byte every 2 s;
    a connection the server answers or closes is replaced at once, so N stay open all phase long
    (an attacker simply reconnects)."""

    HEAD = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{")

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        self.refused = 0
        self.opened = 0
        self.answered: dict[str, int] = {}

    def _open(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(self.HEAD)
            s.setblocking(False)
            self.socks.append(s)
            self.opened += 1
        except OSError:
            self.refused += 1

    def __enter__(self):
        for _ in range(self.n):
            self._open()
        self._t = threading.Thread(target=self._dribble, daemon=True)
        self._t.start()
        return self

    def _dribble(self) -> None:
        while not self._stop.wait(0.25):
            for s in list(self.socks):
                if self._answered(s):
                    self.socks.remove(s)
                    s.close()
                    self._open()
            if int(time.time() * 4) % 8 == 0:  # a byte every 2 s on every connection
                for s in list(self.socks):
                    try:
                        s.send(b" ")
                    except OSError:
                        pass

    def _answered(self, s: socket.socket) -> bool:
        try:
            data = s.recv(200)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
        self.answered[status] = self.answered.get(status, 0) + 1
        return True

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
        for s in self.socks:
            s.close()

    def summary(self) -> dict:
        return {"connections": self.n, "opened": self.opened, "connect_refused": self.refused,
                "server_answers": self.answered}


class DecodeFlood:
    """`threads` clients sending JSON bodies of `per_request` 39.3 MP lossless WebPs, back to back.
    With `bomb=None`: the control -- the same request rate of a body refused at once (bad JSON,
    400), to tell the cost of being flooded from the cost of decoding."""

    def __init__(self, url: str, bomb: bytes | None, per_request: int, threads: int = 4):
        self.url, self.per_request, self.threads = url, per_request, threads
        self.body = (json.dumps({"images_b64": [base64.b64encode(bomb).decode()] * per_request,
                                 "tasks": ["color"]}).encode() if bomb is not None else b"{" * 1800)
        self.codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._ts = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=90) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(self.url + "/classify", content=self.body, headers={"content-type": "application/json"})
                    code = f"{r.status_code} {r.json().get('error', '') if r.status_code >= 400 else ''}".strip()
                except (httpx.HTTPError, ValueError) as err:
                    code = type(err).__name__
                with self._lock:
                    self.codes[code] = self.codes.get(code, 0) + 1
                if code.startswith(("400", "413", "422", "429", "503")):
                    time.sleep(0.05)  # refused at once: an attacker would simply retry

    def __enter__(self):
        [t.start() for t in self._ts]
        return self

    def __exit__(self, *exc):
        self._stop.set()
        [t.join(95) for t in self._ts]

    def summary(self) -> dict:
        return {"threads": self.threads, "images_per_request": self.per_request, "body_bytes": len(self.body),
                "attacker_answers": self.codes}


def attack_phase(srv: Served, name: str, make_attack, phase_s: float) -> dict:
    with GoodClient(srv.url) as base:
        time.sleep(phase_s)
    rss0 = srv.rss_mib()
    peak = rss0
    with make_attack() as attack, GoodClient(srv.url) as good:
        t_end = time.time() + phase_s
        while time.time() < t_end:
            time.sleep(0.5)
            peak = max(peak, srv.rss_mib())
    time.sleep(1)
    b, g = base.summary(), good.summary()
    ratio = round(g["p99_ms"] / b["p99_ms"], 2) if g["p99_ms"] and b["p99_ms"] else None
    res = {"phase": name, "unattacked": b, "attacked": g, "p99_ratio": ratio,
           "pass": bool(ratio is not None and ratio <= 2.0 and g["ok_share"] == 1.0),
           "attack": attack.summary(), "rss_mib_before": rss0, "rss_mib_peak": peak}
    print(json.dumps(res), flush=True)
    return res


# ---- hostile inputs ---------------------------------------------------------------------------------
def hostile_cases(bomb: bytes) -> list[tuple[str, dict]]:
    """(name, request) pairs; request: method, path, headers, body (bytes) or raw (bytes on the socket)."""
    from PIL import Image

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    def js(obj, path="/classify") -> dict:
        return {"method": "POST", "path": path, "headers": {"content-type": "application/json"},
                "body": json.dumps(obj).encode()}

    def mp(fields: list[tuple[str, tuple | str]], path="/classify") -> dict:
        boundary = "b0undary"
        out = io.BytesIO()
        for name, val in fields:
            out.write(f"--{boundary}\r\n".encode())
            if isinstance(val, tuple):
                out.write(f'Content-Disposition: form-data; name="{name}"; filename="{val[0]}"\r\n'
                          f"Content-Type: {val[2]}\r\n\r\n".encode() + val[1] + b"\r\n")
            else:
                out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{val}\r\n'.encode())
        out.write(f"--{boundary}--\r\n".encode())
        return {"method": "POST", "path": path, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"},
                "body": out.getvalue()}

    def img(fmt: str, size=(32, 32), **kw) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, (1, 2, 3)).save(buf, fmt, **kw)
        return buf.getvalue()

    big_png = io.BytesIO()
    Image.new("L", (10000, 6000)).save(big_png, "PNG")
    good = b64(GOOD)
    cases = [
        ("json: not JSON", {"method": "POST", "path": "/classify", "headers": {"content-type": "application/json"}, "body": b"{nope"}),
        ("json: array body", js([1, 2])),
        ("json: deep nesting 1100", {"method": "POST", "path": "/classify", "headers": {"content-type": "application/json"},
                                      "body": b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}"}),
        ("json: deep nesting 100000", {"method": "POST", "path": "/classify", "headers": {"content-type": "application/json"},
                                        "body": b"[" * 100000 + b"]" * 100000}),
        ("json: images_b64 not a list", js({"images_b64": good})),
        ("json: images_b64 of numbers", js({"images_b64": [1, 2]})),
        ("json: bad base64", js({"images_b64": ["***"]})),
        ("json: no images", js({"images_b64": []})),
        ("json: 33 images", js({"images_b64": [good] * 33})),
        ("json: top_k 0", js({"images_b64": [good], "top_k": 0})),
        ("json: top_k string", js({"images_b64": [good], "top_k": "x"})),
        ("json: top_k true", js({"images_b64": [good], "top_k": True})),
        ("json: top_k 1e9", js({"images_b64": [good], "top_k": 10**9})),
        ("json: tasks not a list", js({"images_b64": [good], "tasks": "color"})),
        ("json: unknown task", js({"images_b64": [good], "tasks": ["nope"]})),
        ("json: task ../etc", js({"images_b64": [good], "tasks": ["../etc/passwd"]})),
        ("json: 1000 tasks", js({"images_b64": [good], "tasks": [f"t{i}" for i in range(1000)]})),
        ("json: URL as image", js({"images_b64": ["http://169.254.169.254/latest"]})),
        ("image: text bytes", js({"images_b64": [b64(b"hello world, not an image")]})),
        ("image: TIFF", js({"images_b64": [b64(img("TIFF"))]})),
        ("image: GIF", js({"images_b64": [b64(img("GIF"))]})),
        ("image: BMP", js({"images_b64": [b64(img("BMP"))]})),
        ("image: PDF", js({"images_b64": [b64(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF")]})),
        ("image: truncated PNG", js({"images_b64": [b64(GOOD[:60])]})),
        ("image: truncated JPEG", js({"images_b64": [b64(img("JPEG")[:100])]})),
        ("image: PNG header only", js({"images_b64": [b64(GOOD[:33])]})),
        ("image: 60 MP PNG", js({"images_b64": [b64(big_png.getvalue())]})),
        ("image: 1x20000 strip", js({"images_b64": [b64(img("PNG", (20000, 1)))]})),
        ("image: 2 x 39 MP WebP", js({"images_b64": [b64(bomb)] * 2})),
        ("image: 32 x 39 MP WebP", js({"images_b64": [b64(bomb)] * 32})),
        ("zero_shot: no labels", js({"images_b64": [good]}, "/zero_shot")),
        ("zero_shot: labels not a list", js({"images_b64": [good], "labels": "cat"}, "/zero_shot")),
        ("zero_shot: 300 labels", js({"images_b64": [good], "labels": [f"l{i}" for i in range(300)]}, "/zero_shot")),
        ("zero_shot: 10 kB label", js({"images_b64": [good], "labels": ["x" * 10000]}, "/zero_shot")),
        ("zero_shot: empty label", js({"images_b64": [good], "labels": [" "]}, "/zero_shot")),
        ("zero_shot: duplicate labels", js({"images_b64": [good], "labels": ["a", "a"]}, "/zero_shot")),
        ("zero_shot: template 'a {} }'", js({"images_b64": [good], "labels": ["a"], "templates": ["a {} }"]}, "/zero_shot")),
        ("zero_shot: template '{}}'", js({"images_b64": [good], "labels": ["a"], "templates": ["{}}"]}, "/zero_shot")),
        ("zero_shot: template '{0}'", js({"images_b64": [good], "labels": ["a"], "templates": ["{0}"]}, "/zero_shot")),
        ("zero_shot: template '{}{}'", js({"images_b64": [good], "labels": ["a"], "templates": ["{}{}"]}, "/zero_shot")),
        ("zero_shot: template '{!r}'", js({"images_b64": [good], "labels": ["a"], "templates": ["{!r}"]}, "/zero_shot")),
        ("zero_shot: template '{:>99999}'", js({"images_b64": [good], "labels": ["a"], "templates": ["{:>99999}"]}, "/zero_shot")),
        ("tasks: bad name", js({"name": "../x", "labels": ["a"], "example_labels": ["a"], "images_b64": [good]}, "/tasks")),
        ("tasks: 300-char name", js({"name": "x" * 300, "labels": ["a"], "example_labels": ["a"], "images_b64": [good]}, "/tasks")),
        ("tasks: example label not in labels", js({"name": "t", "labels": ["a"], "example_labels": ["b"], "images_b64": [good]}, "/tasks")),
        ("tasks: replace 'yes'", js({"name": "t", "labels": ["a"], "example_labels": ["a"], "images_b64": [good], "replace": "yes"}, "/tasks")),
        ("tasks: bundle task name", js({"name": "color", "labels": ["a"], "example_labels": ["a"], "images_b64": [good]}, "/tasks")),
        ("tasks: delete unknown", {"method": "DELETE", "path": "/tasks/nope", "headers": {}, "body": b""}),
        ("tasks: delete %2e%2e", {"method": "DELETE", "path": "/tasks/%2e%2e%2fetc", "headers": {}, "body": b""}),
        ("multipart: image as string field", mp([("images", "http://127.0.0.1/x.png")])),
        ("multipart: tasks not JSON", mp([("images", ("a.png", GOOD, "image/png")), ("tasks", "[color")])),
        ("multipart: no boundary", {"method": "POST", "path": "/classify", "headers": {"content-type": "multipart/form-data"}, "body": b"xx"}),
        ("content-type: pickle", {"method": "POST", "path": "/classify", "headers": {"content-type": "application/vnd.bentoml+pickle"}, "body": b"\x80\x04K\x01."}),
        ("content-type: octet-stream", {"method": "POST", "path": "/classify", "headers": {"content-type": "application/octet-stream"}, "body": GOOD}),
        ("content-type: none", {"method": "POST", "path": "/classify", "headers": {}, "body": b"{}"}),
        ("method: GET /classify", {"method": "GET", "path": "/classify", "headers": {}, "body": b""}),
        ("path: unknown", {"method": "GET", "path": "/nope", "headers": {}, "body": b""}),
        ("path: traversal", {"method": "GET", "path": "/../../etc/passwd", "headers": {}, "body": b""}),
        ("body: 25 MB", {"method": "POST", "path": "/classify", "headers": {"content-type": "application/json"}, "body": b"{" + b" " * (25 * 2**20) + b"}"}),
        ("raw: bad Content-Length", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}"}),
        ("raw: negative Content-Length", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}"}),
        ("raw: garbage request line", {"raw": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n"}),
        ("raw: conflicting Content-Length", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"}),
        ("method: POST /livez", {"method": "POST", "path": "/livez", "headers": {}, "body": b""}),
        ("multipart: tasks nested 5000 deep", mp([("images", ("a.png", GOOD, "image/png")), ("tasks", "[" * 5000 + "]" * 5000)])),
        ("raw: duplicate Authorization", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"}),
    ]
    return cases


def _raw(port: int, data: bytes, timeout: float = 40.0) -> tuple[int | None, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf or len(buf) < 4096:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                head, _, body = buf.partition(b"\r\n\r\n")
                clen = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if clen and len(body) >= clen[0]:
                    break
        except socket.timeout:
            return None, buf
    try:
        return int(buf.split(b" ", 2)[1]), buf.partition(b"\r\n\r\n")[2]
    except (IndexError, ValueError):
        return None, buf


def run_hostile(srv: Served, bomb: bytes) -> dict:
    import httpx

    rows = []
    with httpx.Client(timeout=40) as c:
        for name, req in hostile_cases(bomb):
            t0 = time.perf_counter()
            try:
                if "raw" in req:
                    status, body = _raw(srv.port, req["raw"])
                else:
                    r = c.request(req["method"], srv.url + req["path"], headers=req["headers"], content=req["body"])
                    status, body = r.status_code, r.content
            except httpx.HTTPError as err:
                status, body = None, type(err).__name__.encode()
            dt = time.perf_counter() - t0
            try:
                parsed = json.loads(body)
                shaped = isinstance(parsed, dict) and set(parsed) == {"error", "detail"}
            except ValueError:
                parsed, shaped = None, False
            json4xx = status is not None and 400 <= status < 500 and shaped
            after = c.post(srv.url + "/classify", files=[("images", ("g.png", GOOD, "image/png"))],
                           data={"tasks": '["color"]'}).status_code
            ready = c.get(srv.url + "/readyz").status_code
            rows.append({"case": name, "status": status, "error": parsed.get("error") if shaped else None,
                         "json_4xx": json4xx, "seconds": round(dt, 3), "good_after": after, "readyz_after": ready,
                         "body": None if shaped else body[:120].decode("utf-8", "replace")})
            print(json.dumps(rows[-1]), flush=True)
    return {"tried": len(rows), "json_4xx": sum(r["json_4xx"] for r in rows),
            "other": [r for r in rows if not r["json_4xx"]],
            "good_after_all_200": all(r["good_after"] == 200 for r in rows),
            "readyz_after_all_200": all(r["readyz_after"] == 200 for r in rows), "rows": rows}


# ---- two replicas on one PostgreSQL server ------------------------------------------------------------
def run_replicas(head: Path, work: Path, rounds: int = 20) -> dict:
    import httpx
    from pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        return {"skipped": "PostgreSQL server binaries not found"}
    pg = PostgresServer(bindir)
    red, blue = png((230, 10, 10)), png((10, 10, 230))
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate([red, red, blue, blue])]

    def form(name):
        return {"name": name, "labels": '["reddish", "bluish"]', "example_labels": '["reddish", "reddish", "bluish", "bluish"]'}

    def classify(srv, task):
        return httpx.post(srv.url + "/classify", files=[("images", ("r.png", red, "image/png"))],
                          data={"tasks": json.dumps([task])}, timeout=30)

    a = b = None
    try:
        a = Served(head, work, "replica-a", ("--tasks-store", pg.url))
        b = Served(head, work, "replica-b", ("--tasks-store", pg.url))
        visible, gone, races = [], [], []
        for i in range(rounds):
            name = f"t{i}"
            assert httpx.post(a.url + "/tasks", files=files, data=form(name), timeout=30).status_code == 201
            t0 = time.perf_counter()
            while classify(b, name).status_code != 200:
                time.sleep(0.005)
            visible.append(time.perf_counter() - t0)
            assert httpx.delete(a.url + f"/tasks/{name}", timeout=30).status_code == 200
            t0 = time.perf_counter()
            while classify(b, name).status_code != 422:
                time.sleep(0.005)
            gone.append(time.perf_counter() - t0)
            barrier, codes = threading.Barrier(2), {}

            def go(srv, who, name=f"race{i}"):
                barrier.wait()
                codes[who] = httpx.post(srv.url + "/tasks", files=files, data=form(name), timeout=30).status_code

            ts = [threading.Thread(target=go, args=(s, w)) for s, w in ((a, "a"), (b, "b"))]
            [t.start() for t in ts]
            [t.join() for t in ts]
            races.append(sorted(codes.values()))
        ms = lambda xs: {"max_ms": round(max(xs) * 1000, 1), "p50_ms": round(float(np.median(xs)) * 1000, 1)}  # noqa: E731
        res = {"rounds": rounds, "register_on_a_to_200_on_b": ms(visible), "delete_on_a_to_422_on_b": ms(gone),
               "concurrent_same_name_rounds": len(races),
               "rounds_with_exactly_one_201": sum(r == [201, 409] for r in races), "race_codes": races}
    finally:
        for s in (a, b):
            if s is not None:
                s.stop()
        pg.stop()
    print(json.dumps(res), flush=True)
    return res


# ---- report -------------------------------------------------------------------------------------------
def machine() -> dict:
    import PIL

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "pillow": PIL.__version__, "load_avg_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(res: dict) -> str:
    out = [f"# Attack figures ({res['machine']['date']}, commit {res.get('commit', '?')})", "",
           f"Machine: {res['machine']['cpus']} cores shared with other work (load average at start "
           f"{res['machine']['load_avg_at_start'][0]:.1f}); Pillow {res['machine']['pillow']}. "
           "Each attack phase has its own unattacked baseline right before it; target: good p99 <= 2x that "
           "baseline and every good request answered 200.", ""]
    if res.get("phases"):
        out += ["| phase | good p99 unattacked | good p99 attacked | ratio | good 200 share | attacker answers | peak RSS MiB | pass |",
                "|---|---|---|---|---|---|---|---|"]
        for p in res["phases"]:
            att = p["attack"].get("attacker_answers") or p["attack"].get("server_answers")
            out.append(f"| {p['phase']} | {p['unattacked']['p99_ms']} ms | {p['attacked']['p99_ms']} ms | {p['p99_ratio']} | "
                       f"{p['attacked']['ok_share']:.3f} ({p['attacked']['codes']}) | {att} | {p['rss_mib_peak']} | "
                       f"{'yes' if p['pass'] else 'no'} |")
        out.append("")
    h = res.get("hostile")
    if h:
        out += [f"Hostile inputs: tried {h['tried']}, JSON 4xx {h['json_4xx']}, other {len(h['other'])}; good request "
                f"after each: {'all 200' if h['good_after_all_200'] else 'NOT all 200'}; /readyz after each: "
                f"{'all 200' if h['readyz_after_all_200'] else 'NOT all 200'}.", "",
                "| case | status | error | s | good after |", "|---|---|---|---|---|"]
        for r in h["rows"]:
            out.append(f"| {r['case']} | {r['status']} | {r['error'] or ('OTHER: ' + repr(r['body'])[:60])} | "
                       f"{r['seconds']} | {r['good_after']} |")
        out.append("")
    r = res.get("replicas")
    if r and "skipped" not in r:
        out += [f"Two replicas on one PostgreSQL server, {r['rounds']} rounds: register on A -> 200 on B "
                f"p50 {r['register_on_a_to_200_on_b']['p50_ms']} ms, max {r['register_on_a_to_200_on_b']['max_ms']} ms; "
                f"delete on A -> 422 on B p50 {r['delete_on_a_to_422_on_b']['p50_ms']} ms, max "
                f"{r['delete_on_a_to_422_on_b']['max_ms']} ms; concurrent same-name registration from both: "
                f"exactly one 201 in {r['rounds_with_exactly_one_201']} of {r['concurrent_same_name_rounds']} rounds.", ""]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase-s", type=float, default=20.0)
    ap.add_argument("--only", default="slow_body,decode,hostile,replicas")
    ap.add_argument("--out", default=str(REPO / "bench" / "serving" / "attacks"))
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. before)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(REPO / "tests" / "model_configs")
    from test_serving import make_micro_head

    work = Path(tempfile.mkdtemp(prefix="clipheads-attacks-"))
    head = make_micro_head(work)
    bomb = webp_bomb()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    res: dict = {"machine": machine(), "commit": commit, "phases": []}
    if only & {"slow_body", "decode", "hostile"}:
        srv = Served(head, work, "attacked")
        try:
            if "slow_body" in only:
                for n in (64, 256):
                    res["phases"].append(attack_phase(srv, f"slow_body_{n}", lambda n=n: SlowBodies(srv.port, n), args.phase_s))
            if "decode" in only:
                res["phases"].append(attack_phase(srv, "control_flood_400", lambda: DecodeFlood(srv.url, None, 0),
                                                  args.phase_s))
                for per in (32, 1):
                    res["phases"].append(attack_phase(srv, f"decode_{per}x_39MP_webp",
                                                      lambda per=per: DecodeFlood(srv.url, bomb, per), args.phase_s))
            if "hostile" in only:
                res["hostile"] = run_hostile(srv, bomb)
        finally:
            srv.stop()
    if "replicas" in only:
        res["replicas"] = run_replicas(head, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    (out / f"attacks{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"attacks{suffix}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
