"""Issue 15.3: one preprocessing path. The same EXIF-rotated JPEG goes through train-time loading,
the Python Predictor, `clipheads score` and HTTP (a real `clipheads serve` process) and every
path sees the same upright pixels: byte-equal uint8 pixels from the decode function each path
calls, and the same scores out of each real path. The same JPEG with its EXIF orientation
stripped (what a path that ignored EXIF would see) gives other pixels and other scores, so the
equalities below would fail if any path skipped the orientation."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from test_serving import REPO, Server, make_micro_head

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
pq = pytest.importorskip("pyarrow.parquet")

ORIENTATION = 0x0112


def _upright():
    """A PIL image, 60x40, nothing symmetric: a rotation, a flip or a transpose changes every quadrant."""
    from PIL import Image

    rng = np.random.default_rng(7)
    a = np.zeros((40, 60, 3), np.uint8)
    a[:20, :30] = (230, 30, 30)
    a[:20, 30:] = (30, 200, 40)
    a[20:, :15] = (20, 40, 220)
    a[20:, 15:] = (240, 220, 30)
    a[5:12, 40:58] = (250, 250, 250)
    a = np.clip(a.astype(int) + rng.integers(-12, 12, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(head, rotated.jpg, stripped.jpg, upright.png, image-folder root). The JPEG stores the
    pixels turned 90 degrees with EXIF Orientation 6 ("rotate 90 CW to display"), as phones do."""
    from PIL import Image, ImageOps

    d = tmp_path_factory.mktemp("exif")
    head = make_micro_head(d)
    stored = _upright().transpose(Image.Transpose.ROTATE_90)  # 40x60, sideways
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    folder = d / "data" / "thing"
    folder.mkdir(parents=True)
    rotated = folder / "photo.jpg"
    stored.save(rotated, "JPEG", quality=95, exif=exif)
    stripped = d / "stripped.jpg"  # same JPEG bytes, orientation tag gone: the image as stored
    stored.save(stripped, "JPEG", quality=95)
    upright = d / "upright.png"  # what a viewer shows: the decoded JPEG turned upright, lossless
    ImageOps.exif_transpose(Image.open(rotated)).convert("RGB").save(upright)
    assert Image.open(upright).size == (60, 40) and Image.open(stripped).size == (40, 60)
    return head, rotated, stripped, upright, d / "data"


@pytest.fixture(scope="module")
def spec(world):
    from clipheads.training.artifact import load_head
    from clipheads.training.preprocess import PreprocessSpec

    pre = load_head(world[0]).preprocess
    assert pre.to_json()["orientation"] == "exif" and pre.to_json()["colour"] == "rgb"  # what heads record
    return PreprocessSpec.from_json(pre.to_json())


@pytest.fixture(scope="module")
def reference(world, spec):
    """The one function's answer, and the answer of a path that ignored EXIF (must differ)."""
    from clipheads.training.preprocess import prepare_pixels

    ref = prepare_pixels(world[1], spec)
    sideways = prepare_pixels(world[2], spec)
    assert ref.shape == (3, 32, 32) and np.abs(ref.astype(int) - sideways).mean() > 20
    np.testing.assert_array_equal(prepare_pixels(world[3], spec), ref)  # = the upright image
    return ref, sideways


def test_decode_functions_of_every_path_give_the_same_pixels(world, spec, reference):
    """Pixels, as each path computes them: the training data reader + eval/test loader, the
    Predictor, batch scoring's file reader, and the server's untrusted-bytes decoder."""
    from clipheads.predictor import Predictor
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.scoring.job import ScoreJob, decode_spec, load_item, source_info
    from clipheads.training.data.loading import make_loader
    from clipheads.training.data.sources import resolve_spec

    head, rotated, _, _, root = world
    ref, _ = reference
    splits = next(iter(resolve_spec(str(root)).values()))  # the ImageFolder reader `clipheads train` uses
    samples = [*splits.train, *splits.val, *splits.test]
    assert [s.path for s in samples] == [str(rotated)]
    x, _ = next(iter(make_loader(samples, spec, train=False, batch_size=1)))  # eval / test pixels
    back = (x[0].numpy() * np.asarray(spec.std).reshape(3, 1, 1) + np.asarray(spec.mean).reshape(3, 1, 1)) * 255
    np.testing.assert_allclose(back, ref, atol=1e-3)
    with Predictor(head, runtime="torch") as p:
        np.testing.assert_array_equal(p.pixels(str(rotated))[0], ref)
        np.testing.assert_array_equal(p.pixels(rotated.read_bytes())[0], ref)
    info = source_info(str(head))
    job = ScoreJob(source=str(head), input="", output="")
    np.testing.assert_array_equal(load_item(str(rotated), decode_spec(info, job)), ref)  # clipheads score
    np.testing.assert_array_equal(decode_image(rotated.read_bytes(), DecodeSpec.from_preprocess(info["preprocess"])), ref)


def test_training_augmentation_starts_from_the_upright_image(world, spec):
    """The train transform (random resized crop + flip) on the rotated JPEG equals the same
    random transform on the upright PNG, and differs from it on the EXIF-stripped JPEG."""
    import torch

    from clipheads.training.data.loading import SampleDataset, build_transform
    from clipheads.training.data.records import Sample

    _, rotated, stripped, upright, _ = world
    tf = build_transform(spec, train=True)

    def draw(path):
        torch.manual_seed(11)
        ds = SampleDataset([Sample(str(path), 0, "thing")], tf)
        return torch.stack([ds[0][0] for _ in range(4)])

    a, b = draw(rotated), draw(upright)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (draw(stripped) - b).abs().mean() > 0.1


def _scores(pred: dict) -> dict:
    return {task: {r["label"]: r["score"] for r in ranked} for task, ranked in pred.items()}


def _close(a: dict, b: dict, tol: float) -> bool:
    return all(abs(a[t][k] - b[t][k]) <= tol for t in a for k in a[t])


def test_same_scores_through_predictor_score_and_http(world, reference, tmp_path):
    """The real paths end to end: the Predictor, `clipheads score` (a subprocess, Parquet out) and
    a real `clipheads serve` hit over HTTP agree on the rotated JPEG; the stripped one differs."""
    from clipheads.predictor import Predictor

    head, rotated, stripped, _, _ = world
    with Predictor(head, runtime="torch") as p:
        want = _scores(p.predict(str(rotated), top_k=7))
        other = _scores(p.predict(str(stripped), top_k=7))
    assert not _close(want, other, 1e-3)  # orientation changes the answer

    images = tmp_path / "in"
    images.mkdir()
    (images / "rotated.jpg").write_bytes(rotated.read_bytes())
    out = tmp_path / "preds.parquet"
    env_cmd = [sys.executable, "-m", "clipheads", "score", str(head), "--input", str(images), "--output", str(out),
               "--top-k", "7", "--runtime", "torch", "--json", "--model-configs", str(REPO / "tests" / "model_configs")]
    run = subprocess.run(env_cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["scored"] == 1
    row = pq.read_table(out).to_pylist()[0]["predictions"]
    scored = {t: dict(zip(v["top_labels"], v["top_scores"])) for t, v in row.items()}
    assert _close(want, scored, 1e-5), (want, scored)

    srv = Server(head, None, tmp_path / "server.log")
    try:
        got = []
        for path in (rotated, stripped):
            r = httpx.post(srv.url + "/classify", files=[("images", (path.name, path.read_bytes(), "image/jpeg"))],
                           data={"top_k": "7"}, timeout=60)
            assert r.status_code == 200, r.text
            got.append(_scores(r.json()["predictions"][0]))
    finally:
        srv.stop()
    assert _close(want, got[0], 2e-6), (want, got[0])  # HTTP rounds to 6 decimals
    assert _close(other, got[1], 2e-6) and not _close(got[0], got[1], 1e-3)
