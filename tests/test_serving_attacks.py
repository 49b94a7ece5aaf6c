"""Cheap requests that used to cost everyone, against a real `clipheads serve` (issue 16.2, 16.3).

- decode budgets: 38-byte WebPs declaring 39.3 MP each. Two in one request are refused with 413
  `too_many_pixels` from the headers (they decoded for seconds before); with the process budget
  set to one such image, concurrent ones get 503 `decode_busy` at once while a normal request is
  still served; one alone is still classified.
- templates: `"a {} }"` and `"{}}"` are 422 `invalid_template` (they were 500s), and three bad
  requests in a row leave /readyz at 200 (client errors never count toward readiness).
"""
from __future__ import annotations

import base64
import io
import threading

import pytest
from PIL import Image

from test_serving import Server, make_micro_head, png, post

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")

BIG = 16383 * 2400  # pixels one bomb declares


@pytest.fixture(scope="module")
def bomb_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16383, 2400), (9, 9, 9)).save(buf, "WEBP", lossless=True, quality=0, method=0)
    assert len(buf.getvalue()) < 100
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    srv = Server(make_micro_head(d), None, d / "server.log",
                 env_extra={"CLIPHEADS_MAX_DECODE_PIXELS": str(BIG)})  # the process decodes one bomb at a time
    yield srv
    srv.stop()


def _classify_b64(server, images: list[str]):
    return post(server, "/classify", json_body={"images_b64": images, "tasks": ["color"]})


def test_two_bombs_in_one_request_are_refused_from_the_headers(server, bomb_b64):
    r = _classify_b64(server, [bomb_b64, bomb_b64])
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels", r.text
    r = _classify_b64(server, [bomb_b64] * 32)
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels", r.text
    assert _classify_b64(server, [bomb_b64]).status_code == 200  # one alone is within both budgets


def test_concurrent_bombs_get_decode_busy_and_normal_requests_still_pass(server, bomb_b64):
    codes: list = []
    barrier = threading.Barrier(4)

    def attack():
        barrier.wait()
        r = _classify_b64(server, [bomb_b64])
        codes.append((r.status_code, r.json().get("error"), r.headers.get("retry-after")))

    ts = [threading.Thread(target=attack) for _ in range(3)]
    [t.start() for t in ts]
    barrier.wait()
    good = post(server, "/classify", files=[("images", ("a.png", png(), "image/png"))], data={"tasks": '["color"]'})
    [t.join() for t in ts]
    assert good.status_code == 200, good.text
    assert (200, None, None) in codes
    busy = [c for c in codes if c[0] == 503]
    assert busy and all(c[1:] == ("decode_busy", "1") for c in busy), codes


@pytest.mark.parametrize("template", ["a {} }", "{}}", "}{}", "{", "{0}", "{!r}", "{:>99999}"])
def test_bad_templates_are_422(server, template):
    r = post(server, "/zero_shot", json_body={"images_b64": [base64.b64encode(png()).decode()], "labels": ["a", "b"],
                                              "templates": [template]})
    assert r.status_code == 422 and r.json()["error"] == "invalid_template", r.text


def test_client_errors_never_flip_readiness(server):
    img = base64.b64encode(png()).decode()
    for _ in range(4):
        r = post(server, "/zero_shot", json_body={"images_b64": [img], "labels": ["a"], "templates": ["a {} }"]})
        assert r.status_code == 422
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    r = post(server, "/zero_shot", json_body={"images_b64": [img], "labels": ["a", "b"], "templates": ["{{a}} {}"]})
    assert r.status_code == 200, r.text  # escaped braces are fine
