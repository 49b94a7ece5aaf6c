"""Integration: a real `bentoml serve` (front + encoder processes) on a free loopback port.

One server per module (plus one restart). The head is a zero-shot head on the tiny test ViT with
weights saved to a local checkpoint, so the server process rebuilds exactly the same backbone;
"correct labels" means the service returns what the eager runtime computes in this process.
"""
from __future__ import annotations

import io
import json
import urllib.parse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
bentoml = pytest.importorskip("bentoml")

REPO = Path(__file__).resolve().parent.parent
BODY_CAP = 2 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(color=(200, 20, 20), size=(48, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


class Server:
    """`clipheads serve` in its own session (so stop() reaches bentoml and every worker)."""

    def __init__(self, head: Path, tasks_dir: Path | None, log: Path, env_extra: dict | None = None, args: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # own BENTOML_HOME: BentoML keeps its Prometheus multiprocess dir there, shared otherwise
        env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", CLIPHEADS_MAX_BODY_BYTES=str(BODY_CAP),
                   BENTOML_HOME=str(log.parent / f"bentoml-home-{self.port}"),
                   CLIPHEADS_TIMEOUT_S="30", PYTHONPATH=str(REPO))
        env.update(env_extra or {})
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipheads.serving.cli", str(head), "--port", str(self.port),
             *(("--tasks-dir", str(tasks_dir)) if tasks_dir is not None else ()),
             "--model-configs", str(REPO / "tests" / "model_configs"), *args],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready within 120 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the CLI, bentoml and its workers
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its session outlived the CLI (a worker stuck in shutdown) must not linger
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.log.close()


def make_micro_head(d: Path) -> Path:
    """A zero-shot head on the tiny test ViT, weights in a local checkpoint (rebuilt identically)."""
    from conftest import make_backbone
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    bb = make_backbone("test-vit-micro", seed=0)
    ckpt = d / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(ckpt))
    bb = load_backbone("test-vit-micro", str(ckpt))
    tasks = [TaskSpec("color", ("red", "green", "blue")), TaskSpec("shape", ("circle", "square", "triangle", "star"))]
    return save_head(build_method("zeroshot", bb, tasks, {}), d / "zs.head.safetensors")


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    return make_micro_head(tmp_path_factory.mktemp("head"))


@pytest.fixture(scope="module")
def eager(head_file):
    from clipheads.serving.runtimes import TorchRuntime

    return TorchRuntime(head_file, device="cpu")


@pytest.fixture(scope="module")
def server(head_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("srv")
    srv = Server(head_file, d / "tasks", d / "server.log")
    srv.tasks_dir = d / "tasks"
    srv.log_path = d / "server.log"
    yield srv
    srv.stop()


def post(server, route, files=None, data=None, json_body=None, **kw):
    return httpx.post(server.url + route, files=files, data=data, json=json_body, timeout=30, **kw)


def expected(eager, blob: bytes, task: str):
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import softmax

    px = decode_image(blob, DecodeSpec(image_size=32))[None]
    probs = softmax(eager.classify(px, [task])[task])[0]
    labels = eager.tasks[task].classnames
    return [(labels[i], float(probs[i])) for i in np.argsort(-probs)]


def assert_ok_request(server):
    r = post(server, "/classify", files=[("images", ("a.png", png(), "image/png"))], data={"tasks": '["color"]'})
    assert r.status_code == 200, r.text


# ---- correct answers --------------------------------------------------------------------------
def test_classify_mixed_tasks_matches_eager(server, eager):
    blobs = [png((220, 10, 10)), png((10, 200, 30), (30, 60), "JPEG"), png((20, 20, 230), (64, 64), "WEBP")]
    files = [("images", (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    r = post(server, "/classify", files=files, data={"tasks": '["shape", "color"]', "top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["runtime"] == "torch-cpu" and len(body["predictions"]) == 3
    for blob, pred in zip(blobs, body["predictions"]):
        assert list(pred) == ["shape", "color"]
        for task in ("shape", "color"):
            want = expected(eager, blob, task)[:2]
            got = [(p["label"], p["score"]) for p in pred[task]]
            assert [g[0] for g in got] == [w[0] for w in want]
            assert np.allclose([g[1] for g in got], [w[1] for w in want], atol=1e-4)


def test_default_tasks_and_json_base64(server, eager):
    import base64

    blob = png((240, 240, 10))
    r = post(server, "/classify", json_body={"images_b64": [base64.b64encode(blob).decode()], "top_k": 1})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert set(pred) == {"color", "shape"}
    assert pred["color"][0]["label"] == expected(eager, blob, "color")[0][0]


def test_sync_http_client_with_file_paths(server, tmp_path, eager):
    p = tmp_path / "x.png"
    p.write_bytes(png((0, 250, 0)))
    with bentoml.SyncHTTPClient(server.url, server_ready_timeout=10) as client:
        out = client.classify(images=[p], tasks=["color"], top_k=3)
        assert [d["label"] for d in out["predictions"][0]["color"]] == [l for l, _ in expected(eager, p.read_bytes(), "color")]
        zs = client.zero_shot(images=[p], labels=["grass", "sky"])
        assert {d["label"] for d in zs["predictions"][0]} == {"grass", "sky"}


def test_zero_shot_matches_eager_and_caches(server, eager):
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import softmax

    blob = png((30, 30, 200))
    labels = ["ocean", "forest", "desert"]
    files = [("images", ("a.png", blob, "image/png"))]

    def label_sets() -> dict:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return {src: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("clipheads_label_sets_total{") and f'source="{src}"' in line)
                for src in ("cache", "encoder")}

    before = label_sets()
    r1 = post(server, "/zero_shot", files=files, data={"labels": json.dumps(labels), "templates": '["a photo of {}."]'})
    r2 = post(server, "/zero_shot", files=files, data={"labels": json.dumps(labels), "templates": '["a photo of {}."]'})
    assert r1.status_code == 200, r1.text
    assert r1.json() == r2.json()
    after = label_sets()  # the second request's labels came from the front's cache, not the encoder
    assert (after["encoder"] - before["encoder"], after["cache"] - before["cache"]) == (1, 1), (before, after)
    w = eager.encode_texts([f"a photo of {l}." for l in labels])
    f = eager.encode_images(decode_image(blob, DecodeSpec(image_size=32))[None])
    probs = softmax(eager.logit_scale * f @ w.T)[0]
    got = {d["label"]: d["score"] for d in r1.json()["predictions"][0]}
    assert np.allclose([got[l] for l in labels], probs, atol=1e-4)


def test_few_shot_register_classify_list_delete_and_restart(server, head_file, eager):
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import softmax
    from clipheads.serving.tasks import FewShotTask

    red, blue = png((230, 10, 10)), png((10, 10, 230))
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate([red, red, blue, blue])]
    data = {"name": "redblue", "labels": '["reddish", "bluish"]',
            "example_labels": '["reddish", "reddish", "bluish", "bluish"]'}
    r = post(server, "/tasks", files=files, data=data)
    assert r.status_code == 201, r.text
    assert r.json()["shots"] == {"reddish": 2, "bluish": 2}
    assert post(server, "/tasks", files=files, data=data).status_code == 409  # no silent overwrite

    r = post(server, "/classify", files=[("images", ("r.png", red, "image/png")), ("images", ("b.png", blue, "image/png"))],
             data={"tasks": '["redblue", "color"]'})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert "color" in preds[0]
    # the same Tip-Adapter cache model computed eagerly in this process
    spec = DecodeSpec(image_size=32)
    keys = eager.encode_images(np.stack([decode_image(b, spec) for b in (red, red, blue, blue)]))
    text = eager.encode_texts(["a photo of a reddish.", "a photo of a bluish."])
    task = FewShotTask("redblue", ("reddish", "bluish"), keys, np.array([0, 0, 1, 1]), text)
    feats = eager.encode_images(np.stack([decode_image(b, spec) for b in (red, blue)]))
    probs = softmax(task.logits(feats, eager.logit_scale))
    for i in range(2):
        got = {d["label"]: d["score"] for d in preds[i]["redblue"]}
        assert np.allclose([got["reddish"], got["bluish"]], probs[i], atol=1e-4)

    listed = httpx.get(server.url + "/tasks", timeout=10).json()["tasks"]
    assert {t["name"]: t["kind"] for t in listed} == {"color": "bundle", "shape": "bundle", "redblue": "few_shot"}
    (folder,) = server.tasks_dir.iterdir()  # one backbone, one identity folder
    assert (folder / "redblue.json").is_file()
    from clipheads.training.files import default_mode  # the server's files follow its umask (issue 16.9)

    assert {oct(d.stat().st_mode & 0o777) for d in (server.tasks_dir, folder)} == {oct(default_mode(is_dir=True))}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
        p.name: oct(default_mode()) for p in folder.iterdir()}

    # a second registration survives a restart on the same task directory
    r = post(server, "/tasks", files=files[:1] + files[2:3], data={"name": "keep", "labels": '["r", "b"]',
                                                                   "example_labels": '["r", "b"]'})
    assert r.status_code == 201, r.text
    assert httpx.delete(server.url + "/tasks/redblue", timeout=10).status_code == 200
    assert httpx.delete(server.url + "/tasks/redblue", timeout=10).status_code == 404
    assert httpx.delete(server.url + "/tasks/color", timeout=10).status_code == 409

    srv2 = Server(head_file, server.tasks_dir, server.log_path)
    try:
        names = {t["name"] for t in httpx.get(srv2.url + "/tasks", timeout=10).json()["tasks"]}
        assert names == {"color", "shape", "keep"}
        r = httpx.post(srv2.url + "/classify", files=[("images", ("r.png", red, "image/png"))],
                       data={"tasks": '["keep"]'}, timeout=30)
        assert r.status_code == 200, r.text
        assert {d["label"] for d in r.json()["predictions"][0]["keep"]} == {"r", "b"}
    finally:
        srv2.stop()


# ---- bad input: right 4xx, fast, and the worker keeps serving --------------------------------
def raw_multipart(disposition: bytes, value: bytes) -> dict:
    body = (b"--zz\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + value + b"\r\n--zz--\r\n")
    return dict(content=body, headers={"content-type": "multipart/form-data; boundary=zz"})


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


BAD = {
    "truncated": (lambda: dict(files=[("images", ("t.png", png()[:60], "image/png"))]), 422, "invalid_image"),
    "not_an_image": (lambda: dict(files=[("images", ("x.png", b"#!/bin/sh\necho hi\n" * 20, "image/png"))]), 415, "unsupported_format"),
    "pixel_bomb": (lambda: dict(files=[("images", ("h.png", _huge_png(), "image/png"))]), 422, "image_too_large"),
    "oversized_body": (lambda: dict(files=[("images", ("big.png", os.urandom(BODY_CAP + 1000), "image/png"))]), 413, "body_too_large"),
    "unknown_task": (lambda: dict(files=[("images", ("a.png", png(), "image/png"))], data={"tasks": '["nope"]'}), 422, "unknown_task"),
    "no_images": (lambda: dict(json={"tasks": ["color"]}), 422, "no_images"),
    "urlencoded": (lambda: dict(data={"tasks": '["color"]'}), 415, "unsupported_media_type"),
    "bad_tasks_field": (lambda: dict(files=[("images", ("a.png", png(), "image/png"))], data={"tasks": "color"}), 400, "invalid_request"),
    "bad_top_k": (lambda: dict(files=[("images", ("a.png", png(), "image/png"))], data={"top_k": "0"}), 422, "invalid_top_k"),
    "url_instead_of_file": (lambda: raw_multipart(b'name="images"', b"http://169.254.169.254/latest"), 422, "url_not_allowed"),
    "pickle_body": (lambda: dict(content=b"\x80\x05cos\nsystem\n.", headers={"content-type": "application/vnd.bentoml+pickle"}), 415, "unsupported_media_type"),
    "octet_stream": (lambda: dict(content=png(), headers={"content-type": "application/octet-stream"}), 415, "unsupported_media_type"),
    "broken_multipart": (lambda: dict(content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"}), 400, "invalid_request"),
    "broken_json": (lambda: dict(content=b'{"images_b64": [', headers={"content-type": "application/json"}), 400, "invalid_json"),
    "bad_base64": (lambda: dict(json={"images_b64": ["***"]}), 400, "invalid_base64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_right_4xx_quickly(server, case):
    make, status, kind = BAD[case]
    kwargs = make()
    t = time.perf_counter()
    r = httpx.post(server.url + "/classify", timeout=30, **kwargs)
    took = time.perf_counter() - t
    assert r.status_code == status, r.text
    assert r.json()["error"] == kind and r.json()["detail"]
    assert took < 2.0
    assert_ok_request(server)


def test_chunked_body_over_cap_is_413(server):
    def chunks():
        for _ in range(BODY_CAP // 65536 + 4):
            yield b"\0" * 65536

    r = httpx.post(server.url + "/classify", content=chunks(), timeout=30,
                   headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200


def test_ten_thousand_labels_and_long_labels(server):
    files = [("images", ("a.png", png(), "image/png"))]
    r = post(server, "/zero_shot", files=files, data={"labels": json.dumps([f"l{i}" for i in range(10_000)])})
    assert r.status_code == 422 and r.json()["error"] == "too_many_labels"
    r = post(server, "/zero_shot", files=files, data={"labels": json.dumps(["x" * 5000])})
    assert r.status_code == 422 and r.json()["error"] == "label_too_long"
    r = post(server, "/zero_shot", files=files, data={"labels": '["a", "b"]', "templates": '["{0.__class__}"]'})
    assert r.status_code == 422 and r.json()["error"] == "invalid_template"
    assert_ok_request(server)


@pytest.mark.parametrize("name", ["../x", "..", "/etc/passwd", "a/../../x", "x\u0000y", "a" * 300, ".hidden", "%2e%2e", "cats\n", "cats\r\n"])
def test_task_names_cannot_escape_the_store(server, name):
    files = [("images", ("a.png", png(), "image/png"))]
    r = post(server, "/tasks", files=files, data={"name": name, "labels": '["a"]', "example_labels": '["a"]'})
    assert r.status_code == 422 and r.json()["error"] == "invalid_task_name", r.text
    r = httpx.delete(server.url + "/tasks/" + urllib.parse.quote(name, safe=""), timeout=10)
    assert r.status_code in (404, 405, 422), r.text  # 405: the client normalised "/tasks/.." to "/"
    outside = {p.name for p in server.tasks_dir.parent.iterdir()}
    assert {p for p in outside if not p.startswith("bentoml-home-")} <= {"tasks", "server.log"}


def test_metrics_count_requests_rejections_and_tasks(server):
    assert_ok_request(server)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'clipheads_requests_total{endpoint="classify",status="200"}' in text
    assert 'clipheads_rejections_total{kind="image_too_large"}' in text
    assert 'clipheads_rejections_total{kind="unsupported_media_type"}' in text
    assert 'clipheads_task_predictions_total{task="color"}' in text
    assert 'clipheads_images_total{runtime="torch-cpu"}' in text
    assert "clipheads_encoder_batch_size_bucket" in text


@pytest.mark.parametrize("pair", [["Cat", "cat"], ["tabby_cat", "tabby cat"], ["a  b", "a b"], ["cat", "cat "]])
def test_labels_the_text_encoder_reads_alike_are_duplicates(server, pair):
    """Labels that tokenize the same would get one embedding and tie on every image: a 422 naming
    both, on request-time labels and on task registration alike."""
    files = [("images", ("a.png", png(), "image/png"))]
    r = post(server, "/zero_shot", files=files, data={"labels": json.dumps(pair)})
    assert r.status_code == 422 and r.json()["error"] == "duplicate_labels", r.text
    assert repr(pair[0].strip()) in r.json()["detail"] and repr(pair[1].strip()) in r.json()["detail"]
    r = post(server, "/tasks", files=files * 2, data={"name": "dup", "labels": json.dumps(pair),
                                                     "example_labels": json.dumps(pair)})
    assert r.status_code == 422 and r.json()["error"] == "duplicate_labels", r.text
    assert post(server, "/zero_shot", files=files, data={"labels": '["cat", "cats"]'}).status_code == 200


def test_metrics_label_routes_not_client_paths(server):
    """BentoML labels its request metrics by raw path: without serving/metrics.py every
    distinct `DELETE /tasks/<name>` or random 404 path added series forever (front memory, /metrics size)."""
    for i in range(20):
        assert httpx.delete(f"{server.url}/tasks/gone-{i}", timeout=10).status_code == 404
        assert httpx.get(f"{server.url}/scan-{i}", timeout=10).status_code == 404
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert "gone-" not in text and "scan-" not in text
    assert 'endpoint="/tasks/{name}"' in text and 'endpoint="(unmatched)"' in text
    assert 'endpoint="/classify"' in text  # real routes keep their own label


def test_endpoint_label_is_bounded():
    from clipheads.serving.metrics import UNMATCHED, endpoint_label

    routes = frozenset({"/classify", "/tasks", "/tasks/list"})
    assert endpoint_label("/classify", routes) == "/classify"
    assert endpoint_label("/tasks/list", routes) == "/tasks/list"
    assert endpoint_label("/tasks/anything%2F..", routes) == "/tasks/{name}"
    assert endpoint_label("/livez", routes) == "/livez"
    assert {endpoint_label(f"/x{i}/y", routes) for i in range(100)} == {UNMATCHED}


def test_openapi_schema_lists_endpoints(server):
    paths = httpx.get(server.url + "/docs.json", timeout=10).json()["paths"]
    assert {"/classify", "/zero_shot", "/tasks", "/tasks/list", "/tasks/delete"} <= set(paths)
