"""GuardMiddleware in-process around a stub ASGI app: auth, backpressure, timeout, caps, rewrites."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from clipheads.serving.front.config import ServeConfig  # noqa: E402
from clipheads.serving.front.guard import GuardMiddleware  # noqa: E402


def stub_app(delay: float = 0.0, status: int = 200, body: bytes = b'{"ok": true}', ours: bool = True):
    async def app(scope, receive, send):
        msg = await receive()
        if delay:
            await asyncio.sleep(delay)
        hdrs = [(b"content-type", b"application/json")] + ([(b"x-clipheads", b"1")] if ours else [])
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body or msg.get("body", b"")})

    return app


def client(app, **cfg) -> httpx.AsyncClient:
    guard = GuardMiddleware(app, ServeConfig(**cfg))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t")


def run(coro):
    return asyncio.run(coro)


def test_bearer_token_required_except_probes():
    async def go():
        async with client(stub_app(), auth_token="s3cret") as c:
            r = await c.post("/classify", json={})
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            r = await c.post("/classify", json={}, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = await c.post("/classify", json={}, headers={"authorization": "Bearer s3cret"})
            assert r.status_code == 200
            assert (await c.get("/readyz")).status_code == 200

    run(go())


def test_concurrency_limit_answers_429_fast():
    async def go():
        async with client(stub_app(delay=0.5), max_concurrency=2) as c:
            reqs = [c.post("/classify", json={}) for _ in range(6)]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.gather(*reqs)
            codes = sorted(r.status_code for r in results)
            assert codes == [200, 200, 429, 429, 429, 429]
            rejected = [r for r in results if r.status_code == 429]
            assert all(r.headers["retry-after"] == "1" and r.json()["error"] == "overloaded" for r in rejected)
            assert loop.time() - t0 < 1.5

    run(go())


def test_timeout_gives_504_and_releases_the_slot():
    """B5 #10: one guard, max_concurrency=1. While the slow request holds the only slot a second one
    gets 429 (so the limit is live); after its 504 the same instance serves several follow-ups, each
    within 200 ms; a leaked slot would answer them 429."""
    delays = iter([3.0])  # the first request to reach the app sleeps past the timeout, the rest don't

    async def app(scope, receive, send):
        await receive()
        delay = next(delays, 0.0)
        if delay:
            await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"x-clipheads", b"1")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    guard = GuardMiddleware(app, ServeConfig(timeout_s=1, max_concurrency=1))

    async def go():
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            t0 = loop.time()
            slow = asyncio.create_task(c.post("/classify", json={}))
            while guard.in_flight == 0:  # the slow request holds the only slot
                assert loop.time() - t0 < 0.5, "the slow request never took the slot"
                await asyncio.sleep(0.01)
            busy = await c.post("/classify", json={})
            assert busy.status_code == 429 and busy.json()["error"] == "overloaded"
            r = await slow
            assert r.status_code == 504 and r.json()["error"] == "timeout"
            assert 0.9 <= loop.time() - t0 < 2.0
            for _ in range(3):  # what a client sees first: a leaked slot answers these 429
                t1 = loop.time()
                follow = await c.post("/classify", json={})
                assert follow.status_code == 200, (follow.status_code, follow.text)
                assert loop.time() - t1 < 0.2
            assert guard.in_flight == 0

    run(go())


def test_body_cap_with_and_without_content_length():
    async def chunks():
        for _ in range(20):
            yield b"\0" * 1024

    async def go():
        async with client(stub_app(), max_body_bytes=10_000) as c:
            r = await c.post("/classify", content=b"{" + b" " * 20_000 + b"}", headers={"content-type": "application/json"})
            assert r.status_code == 413
            r = await c.post("/classify", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    run(go())


def test_bentoml_errors_are_rewritten_never_500_for_input():
    async def go():
        err = json.dumps({"error": "An unexpected error has occurred"}).encode()
        async with client(stub_app(status=500, body=err, ours=False)) as c:
            r = await c.post("/classify", json={})
            assert r.status_code == 400 and r.json()["error"] == "invalid_request"
        v = json.dumps({"error": "1 validation error", "detail": [{"loc": ["tasks"], "msg": "bad"}]}).encode()
        async with client(stub_app(status=400, body=v, ours=False)) as c:
            r = await c.post("/classify", json={})
            assert r.status_code == 400 and "tasks: bad" in r.json()["detail"]
        u = json.dumps({"error": "application/vnd.bentoml+pickle is not allowed in main server"}).encode()
        async with client(stub_app(status=415, body=u, ours=False)) as c:  # the library's 415: the table's kind
            r = await c.post("/classify", json={})
            assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        # our own 500 (a real runtime failure) passes through untouched
        ours = json.dumps({"error": "internal", "detail": "x"}).encode()
        async with client(stub_app(status=500, body=ours, ours=True)) as c:
            assert (await c.post("/classify", json={})).status_code == 500

    run(go())


def test_rest_aliases_rewrite_to_post_routes():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["method"], scope["path"], (await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-clipheads", b"1")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def go():
        async with client(app) as c:
            await c.get("/tasks")
            await c.delete("/tasks/my-task")
            assert (await c.put("/classify", json={})).status_code == 405

    run(go())
    assert seen == [("POST", "/tasks/list", b"{}"), ("POST", "/tasks/delete", b'{"name": "my-task"}')]


# ---- B5 #23: dependency floors (known CVEs fixed at these versions) ------------------------------
@pytest.mark.parametrize("dist,floor", [("torch", "2.6"), ("pillow", "12.3"), ("starlette", "0.40"),
                                        ("bentoml", "1.4.39")])
def test_dependency_floors(dist, floor):
    from importlib.metadata import version

    from packaging.version import Version

    have = Version(version(dist))
    assert have >= Version(floor), f"{dist} {have} is below the floor {floor} (RELIABILITY.md B5 #23)"


def test_openapi_patch_documents_our_errors_and_rest_aliases():
    from clipheads.serving.front.openapi import patch_openapi

    doc = {"paths": {r: {"post": {"responses": {"200": {"content": {}}}, "requestBody": {}}}
                     for r in ("/classify", "/tasks", "/tasks/list", "/tasks/delete")}}
    out = patch_openapi(doc)
    assert set(out["paths"]["/classify"]["post"]["responses"]) >= {"200", "401", "413", "415", "422", "429", "504"}
    assert "201" in out["paths"]["/tasks"]["post"]["responses"] and "200" not in out["paths"]["/tasks"]["post"]["responses"]
    assert "get" in out["paths"]["/tasks"] and "delete" in out["paths"]["/tasks/{name}"]
    assert out["components"]["schemas"]["ClipheadsError"]["required"] == ["error", "detail"]


# ---- B5 #20: admin routes are 404 unless enabled, then 401 without the token ----------------------
def test_admin_routes_hidden_unless_enabled_with_a_token():
    async def go(**cfg):
        async with client(stub_app(), **cfg) as c:
            no_token = (await c.post("/admin/reload", json={"source": "x"})).status_code
            with_token = (await c.post("/admin/reload", json={"source": "x"},
                                       headers={"authorization": "Bearer s3cret"})).status_code
            return no_token, with_token

    assert run(go()) == (404, 404)  # default: off
    assert run(go(allow_reload=True)) == (404, 404)  # asked for, but no token configured: still off
    assert run(go(auth_token="s3cret")) == (404, 404)  # not enabled: absent, token or not
    assert run(go(auth_token="s3cret", allow_reload=True)) == (401, 200)


def test_openapi_lists_admin_routes_only_when_enabled():
    from clipheads.serving.front.openapi import patch_openapi

    def doc():
        return {"paths": {r: {"post": {"responses": {"200": {"content": {}}}}} for r in ("/classify", "/admin/reload")}}

    assert "/admin/reload" not in patch_openapi(doc())["paths"]
    shown = patch_openapi(doc(), admin=True)["paths"]["/admin/reload"]["post"]["responses"]
    assert {"401", "409", "422"} <= set(shown)


def test_cli_refuses_reload_without_a_token(tmp_path, monkeypatch, capsys):
    from clipheads.serving.cli import main

    monkeypatch.delenv("CLIPHEADS_AUTH_TOKEN", raising=False)
    from test_serving import make_micro_head

    head = make_micro_head(tmp_path)  # a real head: serve opens it before starting
    assert main([str(head), "--allow-reload", "--dry-run"]) == 2
    assert "--allow-reload needs --auth-token" in capsys.readouterr().err
    assert main([str(head), "--allow-reload", "--auth-token", "t", "--dry-run", "--body-timeout", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "CLIPHEADS_ALLOW_RELOAD=1" in out and "CLIPHEADS_BODY_TIMEOUT_S=2.5" in out


# ---- issue 16.1 / 16.4 in-process: the body is read before the request counts in flight ----------
def test_slow_body_gets_408_and_holds_no_in_flight_slot():
    async def go():
        guard = GuardMiddleware(stub_app(), ServeConfig(max_concurrency=1, body_timeout_s=0.3))
        sent: list = []

        async def never():  # a client that announced a body and sends nothing more
            await asyncio.sleep(10)

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "path": "/classify", "method": "POST",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
        slow = asyncio.ensure_future(guard(scope, never, send))
        await asyncio.sleep(0.05)
        assert guard.uploading == 1 and guard.in_flight == 0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            assert (await c.post("/classify", json={})).status_code == 200  # the slot was free
        await slow
        assert sent[0]["status"] == 408 and json.loads(sent[1]["body"])["error"] == "body_timeout"
        assert guard.uploading == 0

    run(go())


def test_uploads_over_their_own_limit_are_429():
    async def go():
        guard = GuardMiddleware(stub_app(), ServeConfig(max_uploads=0))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            r = await c.post("/classify", json={})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"

    run(go())


@pytest.mark.parametrize("body,ok", [(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}", True),
                                     (b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}", False),
                                     (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", False),
                                     (b"[1]", False), (b"{", False)])
def test_json_shape_and_depth(body, ok):
    from clipheads.serving.front.body import json_problem

    assert (json_problem(body) is None) == ok


def test_json_size_is_bounded_before_parsing():
    """Millions of tiny values (objects, numbers, strings) are refused from a count of their bytes,
    before json.loads builds them; brackets and commas inside strings do not count."""
    import json

    from clipheads.serving.front.body import MAX_JSON_VALUES, json_problem

    n = MAX_JSON_VALUES + 1
    for items in (b"{}", b"1", b'"a"', b"[]"):
        problem = json_problem(b'{"x": [' + b",".join([items] * n) + b"]}")
        assert problem and f"more than {MAX_JSON_VALUES} JSON values" in problem
    assert json_problem(b'{"x": [' + b",".join([b"{}"] * (MAX_JSON_VALUES // 3)) + b"]}") is None  # {, and the comma: 2 each
    in_strings = json.dumps({"labels": ["{[,]}" * 100] * 256, "templates": ["a {}, [b]"] * 16}).encode()
    assert in_strings.count(b"{") + in_strings.count(b"[") + in_strings.count(b",") > MAX_JSON_VALUES
    assert json_problem(in_strings) is None


def test_library_answers_on_other_paths_are_reshaped():
    """A not-ready probe, a Starlette 404 and an exception the app lets out: our JSON each time."""
    async def app(scope, receive, send):
        if scope["path"] == "/boom":
            raise RuntimeError("secret internals")
        status = 503 if scope["path"] == "/readyz" else 404
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Service Unavailable" if status == 503 else b"Not Found"})

    async def go():
        async with client(app) as c:
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready" and r.headers["retry-after"] == "1"
            r = await c.get("/nope")
            assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "/nope does not exist"}
            r = await c.get("/boom")
            assert r.status_code == 500 and r.json()["error"] == "internal" and "secret" not in r.text

    run(go())


def test_bytes_of_arriving_bodies_are_capped_per_process():
    async def go():
        guard = GuardMiddleware(stub_app(), ServeConfig(max_upload_bytes=1000))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            r = await c.post("/classify", content=b"{" + b" " * 2000 + b"}", headers={"content-type": "application/json"})
            assert r.status_code == 503 and r.json()["error"] == "overloaded" and r.headers["retry-after"] == "1"
            assert (await c.post("/classify", json={})).status_code == 200  # the budget was given back
        assert guard.upload_bytes.held == 0

    run(go())


def _chunked_request(piece: int, n: int) -> bytes:
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (piece, b"x" * piece) for _ in range(n)) + b"0\r\n\r\n"


class _Transport:
    """What uvicorn's protocols touch of an asyncio transport; keeps what they write."""

    def __init__(self):
        self.out, self.closed = bytearray(), False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data):
        self.out += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_protocol(self, protocol):
        pass


async def _body_length_app(scope, receive, send):
    n, more = 0, True
    while more:
        msg = await receive()
        n, more = n + len(msg.get("body", b"")), msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(str(n)))]})
    await send({"type": "http.response.body", "body": str(n).encode()})


@pytest.mark.parametrize("parser", ["h11", "httptools"])
@pytest.mark.parametrize("piece,n,refused", [(1, 5000, True), (512, 5000, False), (1, 4000, False)])
def test_tiny_chunk_floods_are_refused_by_either_http_parser(parser, piece, n, refused):
    """http_layer's protocol around uvicorn's real h11 and httptools protocols, fed a chunked body:
    more than 4,096 pieces averaging under 256 bytes are our JSON 400 before the app sees the end of
    the body; 512-byte chunks (split across reads), or fewer pieces, reach the app whole."""
    import uvicorn
    from uvicorn.server import ServerState

    from clipheads.serving.front.http_layer import _json_400

    if parser == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base

    async def exchange() -> bytes:
        config = uvicorn.Config(_body_length_app, log_config=None, lifespan="off", http=parser)
        proto = _json_400(base)(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        proto.connection_made(transport)
        wire = _chunked_request(piece, n)
        for i in range(0, len(wire), 65536):  # socket-sized reads
            if transport.closed:
                break
            proto.data_received(wire[i:i + 65536])
            await asyncio.sleep(0)
        for _ in range(50):
            if transport.out:
                break
            await asyncio.sleep(0.01)
        return bytes(transport.out)

    reply = asyncio.run(exchange())
    if refused:
        assert reply.startswith(b"HTTP/1.1 400 ") and b"larger pieces" in reply and b'"invalid_request"' in reply, reply[:300]
    else:
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(str(piece * n).encode()), reply[:300]
