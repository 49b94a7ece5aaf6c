"""Issue 15.4: serving's head openers take the moved-weights override too (`score`, `serve`, the
Python `Predictor`), check its sha256 and say which file they used; `eval`/`export` are in
test_backbone_record.py. One real `clipheads serve` process, hit over HTTP."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from reference_clip import keep_global_rng  # noqa: F401 (autouse)
from test_serving import Server, expected, make_micro_head, png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A head whose backbone checkpoint moved after training: (head, new weights path, images dir)."""
    d = tmp_path_factory.mktemp("moved")
    head = make_micro_head(d)
    new = d / "elsewhere" / "micro.safetensors"
    new.parent.mkdir()
    shutil.move(d / "micro.safetensors", new)
    images = d / "images"
    images.mkdir()
    for i, colour in enumerate(((200, 20, 20), (20, 200, 20), (20, 20, 200))):
        (images / f"{i}.png").write_bytes(png(colour))
    return head, new, images


def test_score_takes_the_override_and_names_the_file(moved, tmp_path, capsys):
    from clipheads.serving.scoring.cli import main

    head, new, images = moved
    base = [str(head), "--input", str(images), "--no-progress", "--runtime", "torch"]
    assert main([*base, "--output", str(tmp_path / "a.parquet")]) == 2
    err = capsys.readouterr().err
    assert "--pretrained NEWPATH" in err and "Traceback" not in err
    assert main([*base, "--output", str(tmp_path / "b.parquet"), "--pretrained", str(new), "--json"]) == 0
    out = capsys.readouterr()
    assert f"weights {new}" in out.err and json.loads(out.out)["scored"] == 3
    assert main([*base, "--output", str(tmp_path / "c.parquet"), "--pretrained", str(head)]) == 2
    assert "not the weights this head was trained on" in capsys.readouterr().err


def test_predictor_takes_the_override(moved):
    from PIL import Image

    from clipheads import Predictor
    from clipheads.serving.runtimes import RuntimeError_

    head, new, _ = moved
    with pytest.raises(RuntimeError_, match="not there any more"):
        Predictor(head, runtime="torch")
    p = Predictor(head, runtime="torch", pretrained=str(new))
    assert p.runtime.backbone_weights.endswith(f"{new} (sha256 {p.runtime.head.backbone.weights_sha256[:12]}…)")
    assert set(p.predict(Image.new("RGB", (40, 40), (200, 20, 20)))) == {"color", "shape"}


def test_serve_takes_the_override(moved, tmp_path):
    from clipheads.serving.cli import main
    from clipheads.serving.runtimes import TorchRuntime

    head, new, _ = moved
    eager = TorchRuntime(head, device="cpu", weights=str(new))
    assert main([str(tmp_path), "--pretrained", str(new), "--dry-run"]) == 2  # not a bundle or head
    assert main([str(head), "--dry-run"]) == 2  # the weights moved: refused before any server starts
    assert main([str(head), "--pretrained", str(head), "--dry-run"]) == 2  # another file's sha256
    srv = Server(head, None, tmp_path / "server.log", args=("--pretrained", str(new)))
    try:
        r = httpx.post(srv.url + "/classify", files=[("images", ("a.png", png(), "image/png"))], timeout=30)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        for task in ("color", "shape"):
            assert [p["label"] for p in pred[task]] == [w[0] for w in expected(eager, png(), task)][:len(pred[task])]
    finally:
        srv.stop()
    assert f"backbone weights {new}" in (tmp_path / "server.log").read_text()  # says which file it uses
