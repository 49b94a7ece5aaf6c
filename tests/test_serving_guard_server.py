"""The front door against a real `clipheads serve` (issue 16.1, 16.4, 16.5, 16.6, 16.7 front items).

One server: bearer token, admin reload enabled, at most 4 requests in flight, a 2 s body deadline.
- slow bodies: more connections than the in-flight limit announce a body and never finish it; a
  good request is still 200 meanwhile (it was 429 for ~35 s), and each slow one gets our 408;
- deeply nested JSON is a fast 400 invalid_json (it was a 35 s plain-text 500);
- every answer is `{"error", "detail"}`: unknown paths, wrong methods, unparseable HTTP (bad
  Content-Length, garbage request line), the upload deadline;
- circus' control endpoints are not TCP ports: the process tree listens on the HTTP port only,
  and every unix socket it listens on lies in a 0700 directory;
- strict types (`top_k=true`, `replace="yes"`), a case-insensitive bearer scheme, duplicate
  Authorization headers refused, reload errors that name no server path and do not tell whether a
  path outside the root exists.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_serving import Server, make_micro_head, png

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

TOKEN = "Guard-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_CONC, BODY_TIMEOUT_S, HEADER_TIMEOUT_S = 4, 2.0, 2.0
IMG = base64.b64encode(png()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard")
    (d / "heads").mkdir()
    srv = Server(make_micro_head(d / "heads"), None, d / "server.log",
                 env_extra={"CLIPHEADS_MAX_CONCURRENCY": str(MAX_CONC), "CLIPHEADS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                            "CLIPHEADS_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)},
                 args=("--auth-token", TOKEN, "--allow-reload"))
    srv.heads = d / "heads"
    yield srv
    srv.stop()


def good(server, **kw):
    return httpx.post(server.url + "/classify", json={"images_b64": [IMG], "tasks": ["color"]},
                      headers=kw.pop("headers", AUTH), timeout=30, **kw)


def raw(server, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def assert_ours(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == kind and body["detail"], body


# ---- 16.1: slow bodies do not hold the door --------------------------------------------------
def test_slow_bodies_do_not_count_in_flight_and_get_408(server):
    head = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{") % TOKEN.encode()
    slow = []
    try:
        t0 = time.perf_counter()
        for _ in range(4 * MAX_CONC):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT_S + 8)
            s.sendall(head)
            slow.append(s)
        time.sleep(0.3)  # all of them are reading their bodies now
        for _ in range(3):
            assert good(server).status_code == 200  # was 429: the slow ones held every slot
        assert time.perf_counter() - t0 < BODY_TIMEOUT_S
        answers = []
        for s in slow:
            data = b""
            while b"}" not in data.partition(b"\r\n\r\n")[2]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            answers.append(data)
        took = time.perf_counter() - t0
    finally:
        for s in slow:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") and b'"error": "body_timeout"' in a for a in answers), answers[0][:300]
    assert BODY_TIMEOUT_S - 0.2 < took < BODY_TIMEOUT_S + 5, took
    assert good(server).status_code == 200


# ---- 16.4: deep JSON ----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [40, 1100, 100_000])
def test_deeply_nested_json_is_a_fast_400(server, depth):
    body = '{"images_b64": ' + "[" * depth + "]" * depth + "}"
    t = time.perf_counter()
    r = httpx.post(server.url + "/classify", content=body, timeout=40,
                   headers={**AUTH, "content-type": "application/json"})
    assert time.perf_counter() - t < 2.0
    assert_ours(r, 400, "invalid_json")
    assert good(server).status_code == 200


# ---- 16.5: one error shape everywhere -------------------------------------------------------------
def test_unknown_paths_and_methods_answer_our_json(server):
    assert_ours(httpx.get(server.url + "/no/such/path", timeout=10), 401, "unauthorized")  # the token first
    assert_ours(httpx.get(server.url + "/no/such/path", headers=AUTH, timeout=10), 404, "not_found")
    assert_ours(httpx.get(server.url + "/static/%2e%2e/x", headers=AUTH, timeout=10), 404, "not_found")
    assert_ours(httpx.post(server.url + "/livez", timeout=10), 405, "method_not_allowed")
    assert_ours(httpx.put(server.url + "/classify", headers=AUTH, timeout=10), 405, "method_not_allowed")
    assert httpx.get(server.url + "/docs.json", timeout=10).json()["paths"]  # BentoML's own routes still work


@pytest.mark.parametrize("request_bytes", [
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"\x16\x03\x01garbage request line\r\n\r\n",
], ids=["non_numeric", "negative", "conflicting", "garbage"])
def test_unparseable_http_gets_our_json_400(server, request_bytes):
    reply = raw(server, request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), reply[:300]
    assert httpx.Response(400, content=body).json()["error"] == "invalid_request"


# ---- 16.6: the process manager is not reachable over TCP ------------------------------------------
def test_only_the_http_port_listens_and_unix_sockets_are_private(server):
    procs = [psutil.Process(server.proc.pid)] + psutil.Process(server.proc.pid).children(recursive=True)
    tcp = {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections("inet")
           if c.status == psutil.CONN_LISTEN}
    assert tcp == {("127.0.0.1", server.port)}, tcp  # before: two more ports answering circus commands
    unix = {c.laddr for p in procs for c in p.net_connections("unix") if c.laddr and not c.raddr}
    assert any("clipheads-circus-" in path for path in unix), unix  # circus' endpoints moved here
    for path in unix:
        folder = Path(path).parent
        mode = folder.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == psutil.Process().uids().real, (path, oct(mode.st_mode))


# ---- 16.7: strict types, auth header parsing, reload answers ---------------------------------------
def test_strict_types(server):
    r = httpx.post(server.url + "/classify", json={"images_b64": [IMG], "top_k": True}, headers=AUTH, timeout=30)
    assert_ours(r, 400, "invalid_request")
    assert "top_k" in r.json()["detail"]
    r = httpx.post(server.url + "/classify", files=[("images", ("a.png", png(), "image/png"))],
                   data={"top_k": "true"}, headers=AUTH, timeout=30)
    assert_ours(r, 400, "invalid_request")
    r = httpx.post(server.url + "/classify", files=[("images", ("a.png", png(), "image/png"))],
                   data={"top_k": "2"}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["color"]) == 2  # multipart numbers still work
    task = {"images_b64": [IMG], "name": "strict", "labels": ["a"], "example_labels": ["a"]}
    r = httpx.post(server.url + "/tasks", json={**task, "replace": "yes"}, headers=AUTH, timeout=30)
    assert_ours(r, 400, "invalid_request")
    assert "replace" in r.json()["detail"]
    assert httpx.post(server.url + "/tasks", json={**task, "replace": True}, headers=AUTH, timeout=30).status_code == 201


def test_bearer_scheme_is_case_insensitive_and_duplicates_are_refused(server):
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert good(server, headers={"authorization": f"{scheme} {TOKEN}"}).status_code == 200, scheme
    assert_ours(good(server, headers={"authorization": f"bearer {TOKEN.lower()}"}), 401, "unauthorized")  # the token is not
    assert_ours(good(server, headers={"authorization": f"Basic {TOKEN}"}), 401, "unauthorized")
    dup = httpx.Headers([("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")])
    assert_ours(good(server, headers=dup), 400, "invalid_request")
    dup = httpx.Headers([("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")])
    assert_ours(good(server, headers=dup), 400, "invalid_request")


def test_reload_errors_name_no_server_path_and_do_not_reveal_existence(server, tmp_path):
    def reload(source):
        return httpx.post(server.url + "/admin/reload", json={"source": source}, headers=AUTH, timeout=60)

    existing, missing = tmp_path / "real.head.safetensors", tmp_path / "missing.head.safetensors"
    existing.write_bytes(b"x")
    a, b = reload(str(existing)), reload(str(missing))
    assert a.status_code == b.status_code == 422 and a.json()["error"] == b.json()["error"] == "source_not_allowed"
    assert a.json()["detail"].replace("real", "missing") == b.json()["detail"]  # same answer, exists or not
    # a bare name outside the root is a model tag: a file of that name in the server's working
    # directory (the repository here) is neither loaded nor revealed
    in_cwd, nowhere = reload("pyproject.toml"), reload("no-such-file.toml")
    assert in_cwd.status_code == nowhere.status_code == 422, in_cwd.text
    assert in_cwd.json()["error"] == nowhere.json()["error"] == "unknown_source", in_cwd.text
    for r in (a, b, reload("/etc/passwd"), reload("../../../etc/passwd"), reload("no-such-model:v9")):
        assert r.status_code == 422, r.text
        assert str(server.heads) not in r.text and str(Path.home()) not in r.text and "bentoml-home" not in r.text, r.text
    (server.heads / "loop-a").symlink_to(server.heads / "loop-b")  # the file system's own errors: 422 too
    (server.heads / "loop-b").symlink_to(server.heads / "loop-a")
    for odd in ("~nosuchuser-clipheads/x.head.safetensors", "a" * 300, "loop-a", "loop-a/x"):
        r = reload(odd)
        assert r.status_code == 422 and r.json()["error"] in ("source_not_allowed", "unknown_source"), (odd[:20], r.text)
    corrupt = server.heads / "corrupt.head.safetensors"  # inside the reload root: loaded, refused
    corrupt.write_bytes(b"\0" * 64)
    r = reload("corrupt.head.safetensors")
    assert_ours(r, 422, "head_load_failed")
    assert str(server.heads) not in r.json()["detail"] and "/tmp" not in r.json()["detail"], r.json()
    assert good(server).status_code == 200  # the serving head stayed


# ---- 16.7: a configuration that can never serve is refused at start ----------------------------------
def _bentoml_serve(env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    from test_serving import REPO, free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPHEADS_")}
    env.update(BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp_path / "bentoml-home"), PYTHONPATH=str(REPO),
               **env_extra)
    return subprocess.run([sys.executable, "-m", "bentoml", "serve", "clipheads.serving.service:ClipHeads",
                           "--port", str(free_port()), "--working-dir", str(REPO)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_bentoml_serve_without_a_source_exits_instead_of_restarting(tmp_path):
    done = _bentoml_serve({}, tmp_path)  # before: the encoder restarted forever (timeout here)
    assert done.returncode != 0
    assert "set CLIPHEADS_SOURCE" in done.stderr, done.stderr[-2000:]
    done = _bentoml_serve({"CLIPHEADS_SOURCE": "no-such-model:v1"}, tmp_path)
    assert done.returncode != 0 and "no such bundle or head" in done.stderr, done.stderr[-2000:]


def test_a_tasks_store_that_is_a_file_is_refused_at_start(server, tmp_path):
    from test_serving import REPO

    afile = tmp_path / "tasks"
    afile.write_text("not a directory")
    head = next(server.heads.glob("*.head.safetensors"))
    done = subprocess.run([sys.executable, "-m", "clipheads.serving.cli", str(head), "--tasks-dir", str(afile),
                           "--model-configs", str(REPO / "tests" / "model_configs")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a directory" in done.stderr, done.stderr
    done = _bentoml_serve({"CLIPHEADS_SOURCE": str(head), "CLIPHEADS_TASKS_DIR": str(afile)}, tmp_path)
    assert done.returncode != 0 and "is not a directory" in done.stderr, done.stderr[-2000:]


# ---- B5 #5 on the internal service: the encoder unpickles nothing ----------------------------------
class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # unpickling this runs open(path, "w"): the marker proves code ran
        return (open, (self.path, "w"))


def _encoder_socket(server) -> str:
    """The encoder's BentoML socket: the unix socket that answers its JSON `/ping`."""
    procs = [psutil.Process(server.proc.pid)] + psutil.Process(server.proc.pid).children(recursive=True)
    paths = sorted({c.laddr for p in procs for c in p.net_connections("unix") if c.laddr and not c.raddr
                    and "clipheads-circus-" not in c.laddr})
    for path in paths:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=2) as c:
                r = c.post("http://encoder/ping", json={"front_pid": 0})
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and "hop" in r.json():
            return path
    raise AssertionError(f"no unix socket answered the encoder's /ping: {paths}")


def test_the_encoder_refuses_pickle_and_runs_no_code(server, tmp_path):
    import pickle

    sock = _encoder_socket(server)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"texts": _Marker(str(marker))})
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=10) as c:
        for ctype in ("application/vnd.bentoml+pickle", "application/octet-stream", "text/plain"):
            r = c.post("http://encoder/encode_texts", content=payload, headers={"content-type": ctype})
            assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", (ctype, r.text[:200])
        two = httpx.Headers([("content-type", "application/vnd.bentoml+pickle"), ("content-type", "application/json")])
        r = c.post("http://encoder/encode_texts", content=payload, headers=two)  # BentoML reads the first
        assert r.status_code == 415, r.text[:200]
        assert not marker.exists()
        ok = c.post("http://encoder/encode_texts", json={"texts": ["a photo of a cat."]})
        assert ok.status_code == 200 and ok.json()["weights"]["shape"][0] == 1  # JSON is what the front sends
    assert good(server).status_code == 200  # and the front, speaking JSON to it, still classifies


# ---- review: hostile HTTP (the fast path and BentoML's route answer alike; nothing is fetched) ------
def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XB", close: bool = True) -> bytes:
    """`parts`: (the part's header block, its body)."""
    out = b"".join(b"--" + boundary + b"\r\n" + h + b"\r\n\r\n" + body + b"\r\n" for h, body in parts)
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


def _post(server, path: str, body: bytes, ctype: str, extra_headers=()) -> httpx.Response:
    headers = httpx.Headers([("authorization", AUTH["authorization"]), ("content-type", ctype), *extra_headers])
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30)


IMAGE_PART = (b'Content-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: image/png', png())


@pytest.mark.parametrize("disposition", [b"form-data; name*=UTF-8''images", b'form-data; name="images"; x="filename"'])
def test_a_text_images_field_is_never_fetched_however_its_name_is_written(server, disposition):
    body = _multipart([(b"Content-Disposition: " + disposition, b"http://127.0.0.1:9/red.png")])
    assert_ours(_post(server, "/classify", body, "multipart/form-data; boundary=XB"), 422, "url_not_allowed")


def test_two_content_type_headers_are_refused(server):
    r = _post(server, "/classify", json.dumps({"images_b64": [IMG]}).encode(), "application/vnd.bentoml+pickle",
              extra_headers=[("content-type", "application/json")])
    assert_ours(r, 400, "invalid_request")


@pytest.mark.parametrize("extra", [[], [(b'Content-Disposition: form-data; name="foo"', b"1")]])
def test_media_types_are_case_insensitive_on_both_routes(server, extra):
    """An unknown extra field makes the strict fast reader decline: BentoML's route answers then."""
    body = _multipart([IMAGE_PART, *extra])
    r = _post(server, "/classify", body, "Multipart/Form-Data; boundary=XB")
    assert r.status_code == 200 and "color" in r.json()["predictions"][0], r.text


@pytest.mark.parametrize("payload", [b"\xef\xbb\xbf" + json.dumps({"images_b64": [IMG]}).encode(),
                                     json.dumps({"images_b64": [IMG]}).encode("utf-16"),
                                     b'{"images_b64": ["\\ud800"]}', b'{"images_b64": ["' + IMG.encode() + b'"], "tasks": ["\\ud800"]}'])
def test_json_that_is_not_utf8_text_is_400_on_both_routes(server, payload):
    for body in (payload, payload.replace(b"{", b'{"foo": 1, ', 1) if payload.startswith(b"{") else payload):
        r = _post(server, "/classify", body, "application/json")
        assert r.status_code == 400 and r.json()["error"] in ("invalid_json", "invalid_request"), r.text[:200]


@pytest.mark.parametrize("headers", [b'Content-Disposition: form-data; name="images"; filename="a\x00b.png"',
                                     b'Content-Disposition : form-data; name="images"; filename="a.png"'])
def test_part_headers_python_multipart_refuses_are_refused_on_the_fast_path_too(server, headers):
    r = _post(server, "/classify", _multipart([(headers, png())]), "multipart/form-data; boundary=XB")
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, r.text[:200]


def test_a_truncated_multipart_body_is_400_not_fewer_images(server):
    body = _multipart([IMAGE_PART, IMAGE_PART], close=False)[:-40]  # cut inside the second image
    assert_ours(_post(server, "/classify", body, "multipart/form-data; boundary=XB"), 400, "invalid_request")
    whole = _post(server, "/classify", _multipart([IMAGE_PART, IMAGE_PART]), "multipart/form-data; boundary=XB")
    assert whole.status_code == 200 and len(whole.json()["predictions"]) == 2


@pytest.mark.parametrize("path", ["/classify/", "/readyz/", "/admin/reload/", "/zero_shot//"])
def test_a_trailing_slash_is_our_404_not_a_redirect(server, path):
    r = httpx.post(server.url + path, json={}, headers=AUTH, timeout=10, follow_redirects=False)
    assert_ours(r, 404, "not_found")
    assert "location" not in r.headers


def test_labels_the_tokenizer_reads_alike_are_duplicates(server):
    for labels in (["ｃａｔ", "cat"], ["a&amp;b", "a&b"], ["e\u0301", "\u00e9"]):
        r = httpx.post(server.url + "/zero_shot", json={"images_b64": [IMG], "labels": labels}, headers=AUTH, timeout=30)
        assert_ours(r, 422, "duplicate_labels")
    r = httpx.post(server.url + "/zero_shot", json={"images_b64": [IMG], "labels": ["x²", "x2"]}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text  # the tokenizer tells these apart: so do we


def test_slow_headers_get_408_and_the_connection_closes(server):
    """Slow loris: a request line and headers dripped in (one byte a second) hold no connection
    past CLIPHEADS_HEADER_TIMEOUT_S; nor does a connection that sends nothing."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        reply = b""
        for byte in b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.5)
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            reply += chunk
            if not chunk or b"\r\n\r\n" in reply:
                break
    took = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in reply, reply[:200]
    assert HEADER_TIMEOUT_S - 0.5 <= took < HEADER_TIMEOUT_S + 3, took
    silent = raw(server, b"", timeout=HEADER_TIMEOUT_S + 5)
    assert silent.startswith(b"HTTP/1.1 408 "), silent[:100]
    assert good(server).status_code == 200  # keep-alive clients and normal requests are untouched
