"""The fast path of POST /classify (serving/front/fast.py) on real servers: the same answers as
BentoML's route for the same requests.

Two `clipheads serve` of the same head, one with the fast path (the default) and one with
`CLIPHEADS_FAST_CLASSIFY=0` (every /classify through BentoML's request path, as before). A script
of requests -- good ones in both encodings and bad ones of every kind the strict reader either
answers itself or hands to BentoML's route -- must get byte-for-byte equal JSON values, statuses
and Retry-After from both, and move our request metrics by the same amounts. BentoML's own
request counter shows which path answered: it does not move on the fast server for the requests
the fast path takes (the ones the strict reader hands on go to BentoML's route below the guard,
past BentoML's outer middlewares, so the counter cannot tell those apart), and the fast server
still writes an access-log line per request.
"""
from __future__ import annotations

import base64
import json

import pytest

from test_serving import Server, make_micro_head, png
from test_serving_ops import parse_metrics

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")

RED, BLUE = png((200, 20, 20)), png((20, 20, 200), size=(64, 48), fmt="JPEG")
BIG = png((20, 200, 20), size=(900, 700))  # over the inline-decode size: the decode thread lane
B64 = base64.b64encode(RED).decode()


def mp(*images, **fields):
    """multipart request kwargs: image files (bytes, or (name, filename, bytes)) + text fields."""
    files = []
    for im in images:
        name, filename, blob = im if isinstance(im, tuple) else ("images", "x.png", im)
        files.append((name, (filename, blob, "image/png") if filename else (None, blob)))
    files += [(k, (None, v)) for k, v in fields.items()]
    return {"files": files}


# (label, request kwargs, answered by the fast path?)
SCRIPT = [
    ("one image", mp(RED), True),
    ("three images, top_k", mp(RED, BLUE, BIG, top_k="2"), True),
    ("tasks subset", mp(BLUE, tasks='["shape"]'), True),
    ("tasks null", mp(RED, tasks="null"), True),
    ("images_b64 in multipart", mp(images_b64=json.dumps([B64, B64])), True),
    ("json", {"json": {"images_b64": [B64], "tasks": ["color"], "top_k": 1}}, True),
    ("json data uri", {"json": {"images_b64": ["data:image/png;base64," + B64]}}, True),
    ("json empty images", {"json": {"images": [], "images_b64": [B64]}}, True),
    ("unknown task", mp(RED, tasks='["nope"]'), True),
    ("duplicate tasks", mp(RED, tasks='["color", "color"]'), True),
    ("no images", {"json": {"tasks": ["color"]}}, True),
    ("too many images", {"json": {"images_b64": [B64] * 33}}, True),
    ("bad base64", {"json": {"images_b64": ["!!notbase64"]}}, True),
    ("not an image", mp(b"hello world, not an image"), True),
    ("cut png", mp(RED[:40]), True),
    ("pixel bomb header", mp(png(size=(8000, 6000))), True),
    # handed to BentoML's route by the strict reader: the answers must still be the same
    ("top_k bool", {"json": {"images_b64": [B64], "top_k": True}}, False),
    ("top_k float", {"json": {"images_b64": [B64], "top_k": 2.0}}, False),
    ("top_k zero", mp(RED, top_k="0"), False),
    ("top_k text", mp(RED, top_k="abc"), False),
    ("tasks not a list", mp(RED, tasks='"color"'), False),
    ("tasks of ints", {"json": {"images_b64": [B64], "tasks": [1]}}, False),
    ("images_b64 not a list", {"json": {"images_b64": B64}}, False),
    ("unknown field", mp(RED, colour="red"), False),
    ("repeated top_k", mp(RED, ("top_k", None, b"1"), ("top_k", None, b"2")), False),
    ("tasks as a file", mp(RED, ("tasks", "t.json", b'["color"]')), False),
    ("json images strings", {"json": {"images": ["abc"]}}, False),
    ("json unknown key", {"json": {"images_b64": [B64], "extra": 1}}, False),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    head = make_micro_head(d)
    fast = Server(head, None, d / "fast.log")
    try:
        lib = Server(head, None, d / "library.log", env_extra={"CLIPHEADS_FAST_CLASSIFY": "0"})
    except Exception:
        fast.stop()
        raise
    yield fast, lib, d
    fast.stop()
    lib.stop()


def _bento_classify(text: str) -> float:
    """BentoML's own request counter for /classify (it counts what reaches its middlewares)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bentoml_service_request_total{") and 'endpoint="/classify"' in line)


def _ours(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("clipheads_requests{", "clipheads_rejections{",
                                                              "clipheads_images{", "clipheads_task_predictions{"))}


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_fast_path_answers_equal_the_bentoml_route(servers):
    fast, lib, d = servers
    with httpx.Client(base_url=fast.url, timeout=60) as f, httpx.Client(base_url=lib.url, timeout=60) as b:
        m0 = {s: parse_metrics(c.get("/metrics").text) for s, c in (("fast", f), ("lib", b))}
        ok = 0
        for label, kw, taken in SCRIPT:
            bento0 = _bento_classify(f.get("/metrics").text), _bento_classify(b.get("/metrics").text)
            rf, rb = f.post("/classify", **kw), b.post("/classify", **kw)
            assert rf.status_code == rb.status_code, (label, rf.text, rb.text)
            assert rf.json() == rb.json(), label
            assert rf.headers.get("retry-after") == rb.headers.get("retry-after"), label
            assert rf.headers["content-type"].startswith("application/json"), label
            moved = _bento_classify(f.get("/metrics").text) - bento0[0], _bento_classify(b.get("/metrics").text) - bento0[1]
            assert moved[1] == 1, label  # the library server's request went through BentoML's stack
            if taken:  # ... and the fast server's did not
                assert moved[0] == 0, (label, "answered by BentoML's route, not the fast path")
            ok += rf.status_code == 200
        assert ok >= 8  # the good requests of the script really were answered
        m1 = {s: parse_metrics(c.get("/metrics").text) for s, c in (("fast", f), ("lib", b))}
    assert _delta(_ours(m1["fast"]), _ours(m0["fast"])) == _delta(_ours(m1["lib"]), _ours(m0["lib"]))
    log = (d / "fast.log").read_text(errors="replace")
    assert log.count("path=/classify") >= len(SCRIPT) and "status=200" in log  # access lines kept


def test_fast_path_keeps_the_guard(servers):
    fast, _, _ = servers
    with httpx.Client(base_url=fast.url, timeout=30) as c:
        assert c.get("/classify").status_code == 405
        r = c.post("/classify", content=b"x", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        r = c.post("/classify", content=b'{"images_b64": ' + b"[" * 40 + b"]" * 40 + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_json"
        r = c.post("/classify", files=[("images", (None, b"http://example.com/x.png"))])
        assert r.status_code == 422 and r.json()["error"] == "url_not_allowed"
        assert c.get("/readyz").status_code == 200
