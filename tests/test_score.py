"""Batch scoring (`clipheads score`): real head, real images, real Parquet, real crashes.

One module-scoped corpus of 1,000 small PNG/JPEG images plus 20 bad files (truncated PNG,
truncated JPEG, a text file, an empty file, an oversized file, a pixel bomb) is scored by the
local engine, by a SIGKILLed-then-resumed subprocess and by Ray Data; all must agree row for row
with direct Runtime calls on `serving.images` decodes (what `/classify` runs).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")

from conftest import TEST_CONFIGS, make_backbone  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_GOOD, N_BAD = 1000, 20
MAX_BYTES = 40_000  # our good images are < 13 kB; the oversized ones are ~120 kB
MAX_PIXELS = 1_000_000  # the pixel bombs claim 2000 x 2000 in a few-kB file
TASKS = {"shape": ("circle", "square", "triangle", "star", "ring"), "color": ("red", "green", "blue")}
BAD_KINDS = {  # kind of bad file -> the ImageRejected kind it must produce
    "trunc_png": "invalid_image", "trunc_jpg": "invalid_image", "text": "unsupported_format",
    "empty": "invalid_image", "oversized": "too_many_bytes", "bomb": "image_too_large",
}


@pytest.fixture(scope="module")
def model_env():
    """The test architecture must be known to subprocesses and Ray actors too."""
    old = os.environ.get("CLIPHEADS_MODEL_CONFIGS")
    os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(TEST_CONFIGS)
    yield {"CLIPHEADS_MODEL_CONFIGS": str(TEST_CONFIGS)}
    if old is None:
        os.environ.pop("CLIPHEADS_MODEL_CONFIGS", None)
    else:
        os.environ["CLIPHEADS_MODEL_CONFIGS"] = old


@pytest.fixture(scope="module")
def head_file(tmp_path_factory, model_env) -> Path:
    """A zero-shot head on test-vit-micro whose backbone weights are a file (so every process,
    subprocess and Ray actor loads the same weights)."""
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    d = tmp_path_factory.mktemp("head")
    bb = make_backbone("test-vit-micro", seed=3)
    weights = d / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    bb = load_backbone("test-vit-micro", str(weights))
    head = build_method("zeroshot", bb, [TaskSpec(n, c) for n, c in TASKS.items()], {})
    return save_head(head, d / "zs.head.safetensors")


def _write_bad(path_stem: Path, kind: str, rng) -> Path:
    from PIL import Image

    if kind == "trunc_png":
        p = path_stem.with_suffix(".png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        p.write_bytes(p.read_bytes()[:300])
    elif kind == "trunc_jpg":
        p = path_stem.with_suffix(".jpg")
        p.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(40))
    elif kind == "text":
        p = path_stem.with_suffix(".png")  # the name lies; the bytes decide
        p.write_text("definitely not an image\n")
    elif kind == "empty":
        p = path_stem.with_suffix(".jpg")
        p.write_bytes(b"")
    elif kind == "oversized":
        p = path_stem.with_suffix(".png")
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(p)
        assert p.stat().st_size > MAX_BYTES
    elif kind == "bomb":
        p = path_stem.with_suffix(".png")
        Image.new("RGB", (2000, 2000), (7, 7, 7)).save(p, optimize=True)
        assert p.stat().st_size < MAX_BYTES
    else:
        raise AssertionError(kind)
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """1,000 good 32-64 px images (PNG and JPEG) in 10 subfolders and 20 bad files mixed in.
    Returns (root, {relative path of each bad file: expected rejection kind})."""
    from PIL import Image

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    total = N_GOOD + N_BAD
    bad_at = set(rng.choice(total, N_BAD, replace=False).tolist())
    kinds = list(BAD_KINDS)
    bad: dict[str, str] = {}
    for i in range(total):
        d = root / f"part{i % 10}"
        d.mkdir(exist_ok=True)
        stem = d / f"img{i:05d}"
        if i in bad_at:
            kind = kinds[len(bad) % len(kinds)]
            p = _write_bad(stem, kind, rng)
            bad[p.relative_to(root).as_posix()] = BAD_KINDS[kind]
            continue
        w, h = (int(v) for v in rng.integers(32, 65, size=2))
        base = rng.integers(0, 255, 3)
        arr = np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        if i % 2:
            Image.fromarray(arr).save(stem.with_suffix(".png"))
        else:
            Image.fromarray(arr).save(stem.with_suffix(".jpg"), quality=90)
    return root, bad


def _job(head, inp, out, **kw):
    from clipheads.serving.scoring import ScoreJob

    base = dict(source=str(head), input=str(inp), output=str(out), top_k=10, batch_size=64, workers=2,
                shard_size=128, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, progress=False)
    base.update(kw)
    return ScoreJob(**base)


@pytest.fixture(scope="module")
def local_run(head_file, corpus, tmp_path_factory):
    from clipheads.serving.scoring import score

    out = tmp_path_factory.mktemp("local") / "preds.parquet"
    summary = score(_job(head_file, corpus[0], out))
    return out, summary


def _flat(t):
    """`predictions.<task>.<field>` struct columns -> `<task>.<field>` columns (test convenience)."""
    t = t.flatten().flatten()
    return t.rename_columns([n.removeprefix("predictions.") for n in t.column_names])


def _read(out: Path):
    return _flat(pq.read_table(out)).sort_by("index")


def _errors(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _reference(source, corpus_root: Path, rel_paths: list[str], kind: str = "torch") -> dict[str, dict[str, dict[str, float]]]:
    """What /classify computes: serving.images decode + Runtime logits + softmax, per image,
    here in batches of 7 (the service's adaptive batcher picks its own sizes)."""
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import open_runtime, softmax

    rt = open_runtime(source, kind)
    spec = DecodeSpec.from_preprocess(rt.preprocess)
    ref = {}
    for a in range(0, len(rel_paths), 7):
        chunk = rel_paths[a:a + 7]
        pixels = np.stack([decode_image((corpus_root / p).read_bytes(), spec) for p in chunk])
        out = rt.classify(pixels)
        for j, p in enumerate(chunk):
            ref[p] = {t: dict(zip(rt.tasks[t].classnames, softmax(out[t][j]).tolist())) for t in TASKS}
    return ref


# ---- the local engine ------------------------------------------------------------------------
def test_scores_1000_images_and_lists_20_bad_files(local_run, corpus, head_file):
    out, summary = local_run
    root, bad = corpus
    t = _read(out)
    assert (summary.scored, summary.failed, summary.total) == (N_GOOD, N_BAD, N_GOOD + N_BAD)
    assert t.num_rows == N_GOOD
    assert len(set(t.column("index").to_pylist())) == N_GOOD
    listed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert set(t.column("path").to_pylist()) == set(listed) - set(bad)
    # rows keep the listing order and every index is its position in the sorted listing
    assert [listed[i] for i in t.column("index").to_pylist()] == t.column("path").to_pylist()

    errs = _errors(out / "_errors.jsonl")
    assert {e["path"]: e["kind"] for e in errs} == bad
    assert all(e["detail"] and listed[e["index"]] == e["path"] for e in errs)

    m = json.loads((out / "_manifest.json").read_text())
    assert m["complete"] and m["rows"] == N_GOOD and m["errors"] == N_BAD
    assert len(m["shards"]) == -(-(N_GOOD + N_BAD) // 128)
    assert m["job"]["source_sha256"] and m["job"]["tasks"] == {k: list(v) for k, v in TASKS.items()}
    # bounded memory: pool window (2 batches) + queue (2) + the batch being filled + the one running
    assert 0 < summary.peak_buffered_images <= 6 * 64


def test_predictions_match_the_classify_path(local_run, corpus, head_file):
    out, _ = local_run
    t = _read(out).to_pylist()
    ref = _reference(head_file, corpus[0], [r["path"] for r in t])
    for r in t:
        for task, classes in TASKS.items():
            want = ref[r["path"]][task]
            got = dict(zip(r[f"{task}.top_labels"], r[f"{task}.top_scores"]))
            assert set(got) == set(classes)  # top_k=10 keeps every class
            assert max(abs(got[c] - want[c]) for c in classes) < 1e-5, (r["path"], task)
            assert r[f"{task}.label"] == r[f"{task}.top_labels"][0]
            assert r[f"{task}.score"] == pytest.approx(max(want.values()), abs=1e-5)
            scores = r[f"{task}.top_scores"]
            assert scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def real_bundle(head_file, tmp_path_factory) -> Path:
    """The head exported by the real exporter (export/), fp32 ONNX, parity-gated."""
    try:
        from clipheads.export.heads import load_heads
        from clipheads.export.pipeline import ExportOptions, export_heads
    except ImportError as err:
        pytest.skip(f"the exporter is not available in this checkout: {err}")
    heads, meta, pre = load_heads([str(head_file)])
    out = tmp_path_factory.mktemp("bundle") / "zs.bundle"
    res = export_heads(heads, out, ExportOptions(probes=8, text=False), meta, pre)
    assert res.passed and res.bundle is not None, res.parity.get("failures")
    return Path(res.bundle)


def test_real_onnx_bundle_scores_like_its_head_and_its_runtime(real_bundle, local_run, corpus, tmp_path):
    """`clipheads score BUNDLE` (ONNX Runtime) on the 1,020 files: the same rows and errors as the
    head in eager PyTorch, and exactly what the bundle's own Runtime gives per image."""
    from clipheads.serving.scoring import score

    out = tmp_path / "onnx.parquet"
    s = score(_job(real_bundle, corpus[0], out, runtime="onnx-cpu"))
    assert (s.scored, s.failed) == (N_GOOD, N_BAD) and s.runtime == "onnx-cpu"
    t, eager = _read(out), _read(local_run[0])
    assert t.column("path").equals(eager.column("path"))
    assert (out / "_errors.jsonl").read_text() == (local_run[0] / "_errors.jsonl").read_text()
    for task in TASKS:  # ONNX vs eager: fp32 parity
        np.testing.assert_allclose(np.asarray(t.column(f"{task}.top_scores").to_pylist()),
                                   np.asarray(eager.column(f"{task}.top_scores").to_pylist()), atol=1e-4)
        assert t.column(f"{task}.label").equals(eager.column(f"{task}.label"))
    rows = t.to_pylist()[::10]
    ref = _reference(real_bundle, corpus[0], [r["path"] for r in rows], kind="onnx-cpu")
    for r in rows:
        for task in TASKS:
            got = dict(zip(r[f"{task}.top_labels"], r[f"{task}.top_scores"]))
            assert max(abs(got[c] - ref[r["path"]][task][c]) for c in TASKS[task]) < 1e-5


def _parts_metadata(out: Path) -> list[dict]:
    """The `clipheads` key-value metadata of every committed part, read from the Parquet footers."""
    manifest = json.loads((out / "_manifest.json").read_text())
    return [json.loads(pq.ParquetFile(out / rec["file"]).schema_arrow.metadata[b"clipheads"])
            for rec in manifest["shards"].values()]


def test_parquet_schema_and_provenance_in_every_part(real_bundle, corpus, small, tmp_path):
    """Issue 15.8: no dots in column names (a `predictions` struct per task), embeddings and top-k
    as fixed-size lists, and the schema + provenance (bundle sha256, head version, heads,
    preprocessing, the real runtime) in the key-value metadata of every part."""
    import pyarrow as pa

    from clipheads.serving.runtimes import read_manifest, source_sha256
    from clipheads.serving.scoring import score

    out = tmp_path / "p.parquet"
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{corpus[0] / q}\n" for q in small[:10]))
    s = score(_job(real_bundle, lst, out, runtime="auto", embeddings=True, top_k=3, shard_size=4))
    assert s.shards_committed == 3 and s.runtime == "onnx-cpu"
    manifest = read_manifest(real_bundle)
    dim = manifest["backbone"]["embed_dim"]
    for part in sorted(out.glob("part-*.parquet")):
        schema = pq.ParquetFile(part).schema_arrow
        assert schema.names == ["index", "path", "predictions", "embedding"]
        assert all("." not in f.name for f in schema) and not any("." in n for n in schema.field("predictions").type.names)
        assert schema.field("embedding").type == pa.list_(pa.float32(), dim)  # fixed size
        shape = schema.field("predictions").type.field("shape").type
        assert shape.field("top_labels").type == pa.list_(pa.string(), 3)
        assert shape.field("top_scores").type == pa.list_(pa.float32(), 3)
        assert shape.field("label").type == pa.string() and shape.field("score").type == pa.float32()
    metas = _parts_metadata(out)
    sha = source_sha256(real_bundle)
    assert len(metas) == 3 and [m["part"]["start"] for m in metas] == [0, 4, 8]
    for m in metas:
        assert m["format"] == "clipheads-scores" and m["format_version"] == 2
        assert m["source_kind"] == "bundle" and m["source_sha256"] == sha and m["source_version"] == sha[:12]
        assert m["heads"] == [{"file": manifest["heads"][0]["file"], "method": "zeroshot", "tasks": list(TASKS)}]
        assert m["preprocess"] == manifest["preprocess"] and m["preprocess"]["orientation"] == "exif"
        assert m["tasks"] == {k: list(v) for k, v in TASKS.items()}
        assert m["runtime"] == "onnx-cpu" and m["engine"] == "local"
        assert set(m["columns"]) >= {"index", "path", "predictions.<task>.label", "embedding"}
        assert m["backbone"]["arch"] == "test-vit-micro" and m["package_version"]
    t = _read(out)  # the values behind the types: best first, top-1 == first of top-k, unit embeddings
    emb = np.asarray(t.column("embedding").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert t.column("shape.label").to_pylist() == [r[0] for r in t.column("shape.top_labels").to_pylist()]


def test_rerun_of_a_finished_job_rescores_nothing(local_run, head_file, corpus):
    from clipheads.serving.scoring import score

    out, _ = local_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    s = score(_job(head_file, corpus[0], out))
    assert (s.scored, s.failed, s.skipped, s.shards_committed) == (0, 0, N_GOOD + N_BAD, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    assert _read(out).num_rows == N_GOOD


# ---- crash and resume ------------------------------------------------------------------------
def _cli(head_file, inp, out, *extra) -> list[str]:
    return [sys.executable, "-m", "clipheads.cli", "score", str(head_file), "--input", str(inp), "--output", str(out),
            "--top-k", "10", "--shard-size", "100", "--batch-size", "16", "--workers", "1",
            "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS), "--no-progress", *extra]


def test_sigkill_mid_run_then_resume_gives_one_row_per_image(head_file, corpus, local_run, tmp_path, model_env):
    root, bad = corpus
    out = tmp_path / "preds.parquet"
    env = {**os.environ, **model_env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(head_file, root, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 120
    committed = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file():
            committed = json.loads(manifest.read_text())["shards"]
            if committed:
                break
        time.sleep(0.01)
    assert committed, f"no shard committed before exit/timeout: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    m = json.loads(manifest.read_text())
    assert not m["complete"] and 0 < len(m["shards"]) < 11, "the job must be killed mid-run"
    first = {k: (out / v["file"]).stat() for k, v in m["shards"].items()}

    res = subprocess.run(_cli(head_file, root, out, "--json"), cwd=REPO, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    s = json.loads(res.stdout)
    assert s["shards_skipped"] >= len(first) and s["skipped"] >= 100 * len(first)
    assert s["rows_total"] == N_GOOD and s["errors_total"] == N_BAD
    for k, st in first.items():  # committed shards were not rewritten
        now = (out / m["shards"][k]["file"]).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    t = _read(out)
    idx = t.column("index").to_pylist()
    assert len(idx) == len(set(idx)) == N_GOOD  # exactly one row per image
    assert {e["path"]: e["kind"] for e in _errors(out / "_errors.jsonl")} == bad
    ref = _read(local_run[0])
    assert t.column("path").equals(ref.column("path"))
    for task in TASKS:
        assert t.column(f"{task}.top_labels").equals(ref.column(f"{task}.top_labels"))
        np.testing.assert_allclose(t.column(f"{task}.score").to_numpy(), ref.column(f"{task}.score").to_numpy(),
                                   atol=1e-5)
    assert not list(out.glob(".*tmp-*")), "no temp files left behind"


# ---- inputs, errors file, exit codes ---------------------------------------------------------
@pytest.fixture(scope="module")
def small(corpus) -> list[str]:
    """20 good files of the corpus, as relative paths."""
    root, bad = corpus
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and p.relative_to(root).as_posix() not in bad)[:20]


def test_csv_and_parquet_listings_with_missing_files(head_file, corpus, small, tmp_path):
    import pyarrow as pa

    from clipheads.serving.scoring import score

    root, _ = corpus
    paths = [str(root / p) for p in small[:10]] + ["does/not/exist.png"] + [str(root / p) for p in small[10:]]
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(paths)))
    pq_in = tmp_path / "in.parquet"
    pq.write_table(pa.table({"path": paths}), pq_in)
    outs = []
    for inp in (csv_in, pq_in):
        out = tmp_path / f"{inp.suffix[1:]}.parquet"
        s = score(_job(head_file, inp, out, embeddings=True, errors=str(tmp_path / f"{inp.suffix[1:]}-errors.csv"),
                       shard_size=8, batch_size=4))
        assert (s.scored, s.failed) == (20, 1)
        t = _read(out)
        assert t.column("path").to_pylist() == paths[:10] + paths[11:]
        emb = np.asarray(t.column("embedding").to_pylist())
        assert emb.shape[0] == 20 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        lines = (tmp_path / f"{inp.suffix[1:]}-errors.csv").read_text().splitlines()
        assert lines[0] == "index,path,kind,detail" and lines[1].startswith("10,does/not/exist.png,unreadable,")
        outs.append(t)
    assert outs[0].equals(outs[1])


def test_output_and_errors_inside_the_input_dir_are_not_inputs(head_file, corpus, small, tmp_path):
    import shutil

    from clipheads.serving.scoring import score

    inp = tmp_path / "imgs"
    inp.mkdir()
    for p in small[:5]:
        shutil.copy(corpus[0] / p, inp / Path(p).name)
    for _ in range(2):  # the second run resumes: the outputs written by the first must not count as inputs
        s = score(_job(head_file, inp, inp / "preds.parquet", errors=str(inp / "errors.jsonl")))
        assert s.total == 5 and s.rows_total == 5 and s.errors_total == 0


def test_task_subset_top1_only(head_file, corpus, small, tmp_path):
    from clipheads.serving.scoring.cli import main

    out = tmp_path / "p.parquet"
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{corpus[0] / p}\n" for p in small))
    assert main([str(head_file), "--input", str(lst), "--output", str(out), "--tasks", "color", "--top-k", "1",
                 "--no-progress"]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["index", "path", "predictions"]
    assert _flat(t).column_names == ["index", "path", "color.label", "color.score"]


def test_exit_codes(head_file, corpus, small, tmp_path, capsys):
    from clipheads.serving.scoring.cli import main

    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{corpus[0] / p}\n" for p in small[:3]))
    out = tmp_path / "o.parquet"
    base = [str(head_file), "--input", str(lst), "--output", str(out), "--no-progress"]
    assert main([]) == 2  # argparse usage error
    assert main([str(tmp_path / "nope"), "--input", str(lst), "--output", str(out)]) == 2
    assert main([str(head_file), "--input", str(tmp_path / "nope"), "--output", str(out)]) == 2
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file\nx.png\n")
    assert main([str(head_file), "--input", str(bad_csv), "--output", str(out)]) == 2
    capsys.readouterr()
    for name, body in [("latin1-header.csv", "path\xe9\nx.png\n".encode("latin-1")),  # a bad byte in the header
                       ("latin1-rows.csv", b"path\n" + b"".join(f"{corpus[0] / p}\n".encode() for p in small[:2])
                        + "caf\xe9.png\n".encode("latin-1")),  # ... or in a later row
                       ("huge-field.csv", b'path\n"' + b"x" * 200_000 + b'"\n')]:  # over csv's field limit
        (tmp_path / name).write_bytes(body)
        assert main([str(head_file), "--input", str(tmp_path / name), "--output", str(tmp_path / f"{name}.parquet"),
                     "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert "clipheads score: error:" in err and "Traceback" not in err and name in err, err
        assert not (tmp_path / f"{name}.parquet").exists(), name  # stopped before OUT was made
    assert main(base + ["--tasks", "nosuchtask"]) == 2
    assert main(base + ["--batch-size", "0"]) == 2
    assert main(base) == 0
    assert main(base + ["--top-k", "2"]) == 2  # OUT holds a different job
    assert "different job" in capsys.readouterr().err
    assert main(base + ["--top-k", "2", "--overwrite"]) == 0
    notours = tmp_path / "notours"
    notours.mkdir()
    (notours / "keep.txt").write_text("x")
    assert main([str(head_file), "--input", str(lst), "--output", str(notours), "--overwrite"]) == 2
    assert (notours / "keep.txt").exists()


def test_changed_inputs_under_a_committed_shard_are_refused(head_file, corpus, small, tmp_path):
    from clipheads.serving.scoring import score
    from clipheads.serving.scoring.shards import OutputConflict

    root, _ = corpus
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{root / p}\n" for p in small[:8]))
    out = tmp_path / "o.parquet"
    score(_job(head_file, lst, out, shard_size=4))
    lst.write_text("path\n" + "".join(f"{root / p}\n" for p in small[1:9]))  # same count, shifted
    with pytest.raises(OutputConflict, match="changed"):
        score(_job(head_file, lst, out, shard_size=4))


# ---- Ray Data engine -------------------------------------------------------------------------
@pytest.mark.integration
def test_ray_engine_matches_local_engine(head_file, corpus, local_run, small, tmp_path, model_env):
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ray[data] is not installed (pip install -r requirements/ray.txt): {err}")
    from clipheads.serving.scoring import score

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    bundle, _ = _tiny_bundle(tmp_path / "bundle")
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{corpus[0] / q}\n" for q in small) + "missing.png\n")
    try:
        out = tmp_path / "ray.parquet"
        s = score(_job(head_file, corpus[0], out, engine="ray", workers=2))
        # the ONNX runtime in Ray actors, with embeddings, in the decode-stage layout for GPU actors
        # (decode_batch -> numpy pixels -> actors; on these CPU-only actors Ray fuses the two stages,
        # the data path is the same) equals the local engine too. (One Ray job: the default layout is
        # the torch job above; a third job cost ~25 s of Ray workers and checked nothing new.)
        onnx_kw = dict(runtime="onnx-cpu", embeddings=True, batch_size=8, shard_size=6)
        score(_job(bundle, lst, tmp_path / "onnx-ray.parquet", engine="ray", workers=1, ray_decode="tasks",
                   **onnx_kw))
    finally:
        ray.shutdown()
    score(_job(bundle, lst, tmp_path / "onnx-local.parquet", **onnx_kw))
    a, b = _read(tmp_path / "onnx-local.parquet"), _read(tmp_path / "onnx-ray.parquet")
    assert a.num_rows == b.num_rows == len(small) and a.column("path").equals(b.column("path"))
    np.testing.assert_allclose(np.asarray(a.column("embedding").to_pylist()),
                               np.asarray(b.column("embedding").to_pylist()), atol=1e-6)
    assert a.column("shape.top_labels").equals(b.column("shape.top_labels"))
    assert (_errors(tmp_path / "onnx-ray.parquet" / "_errors.jsonl")
            == _errors(tmp_path / "onnx-local.parquet" / "_errors.jsonl") != [])
    assert (s.scored, s.failed) == (N_GOOD, N_BAD)
    # the runtime the actors really opened, not the requested "auto"
    assert s.runtime == "ray:torch-cpu" and {m["runtime"] for m in _parts_metadata(out)} == {"torch-cpu"}
    assert {m["runtime"] for m in _parts_metadata(tmp_path / "onnx-ray.parquet")} == {"onnx-cpu"}
    assert {m["engine"] for m in _parts_metadata(tmp_path / "onnx-ray.parquet")} == {"ray"}
    local, got = _read(local_run[0]), _read(out)
    assert got.schema == local.schema
    for name in local.column_names:
        if name.endswith("score") or name.endswith("scores"):
            a = np.asarray(local.column(name).to_pylist(), np.float64)
            b = np.asarray(got.column(name).to_pylist(), np.float64)
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        else:
            assert got.column(name).equals(local.column(name)), name
    assert (out / "_errors.jsonl").read_text() == (local_run[0] / "_errors.jsonl").read_text()
    m = json.loads((out / "_manifest.json").read_text())
    assert m["complete"] and {v["engine"] for v in m["shards"].values()} == {"ray"}


def test_multi_path_head_and_embeddings(head_file, corpus, small, tmp_path):
    """A VPT head has one image path per task: each task's columns come from its own path and the
    embedding from the zero-shot path (the first task's, as in the head's bundle: zero_shot_path),
    as the Runtime computes them."""
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import open_runtime, softmax
    from clipheads.serving.scoring import score
    from clipheads.training.artifact import load_head, save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    art = load_head(head_file)
    bb = load_backbone(art.backbone["arch"], art.backbone["pretrained"])
    vpt = save_head(build_method("vpt", bb, [TaskSpec(n, c) for n, c in TASKS.items()], {}), tmp_path / "vpt.head.safetensors")
    root = corpus[0]
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{root / p}\n" for p in small))
    out = tmp_path / "vpt.parquet"
    score(_job(vpt, lst, out, embeddings=True, top_k=2, batch_size=8))
    t = _read(out)
    rt = open_runtime(vpt, "torch")
    assert len(set(ti.path for ti in rt.tasks.values())) == 2 and rt.base_path == 0 and len(rt.paths) == 2
    spec = DecodeSpec.from_preprocess(rt.preprocess)
    px = np.stack([decode_image((root / p).read_bytes(), spec) for p in small])
    want = rt.classify(px)
    feats = rt.encode_images(px)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(t.column("embedding").to_pylist()), feats, atol=1e-5)
    for task, classes in TASKS.items():
        p = softmax(want[task])
        assert t.column(f"{task}.label").to_pylist() == [classes[i] for i in p.argmax(1)]
        np.testing.assert_allclose(t.column(f"{task}.score").to_numpy(), p.max(1), atol=1e-5)
    # the embedding is the prompted tower's, not plain CLIP's
    plain = rt.head.backbone.encode_image(rt._pixels(px)).numpy()
    assert not np.allclose(feats, plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-4)


# ---- ONNX bundle (hand-built to the DESIGN.md contract until export/ lands) -------------------
def _tiny_bundle(d: Path, image_size: int = 32) -> tuple[Path, dict]:
    """A bundle whose image graph follows the contract: `pixels` (N,3,S,S) uint8 + `task_index`
    (N,) int64 -> `logits` (N, 5+3), `features` (N, 8). Features: pooled 4x4 patches through a fixed
    projection, L2-normalised; logits: 100 * features @ W + a per-task bias row picked by task_index."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    mean = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32).reshape(1, 3, 1, 1)
    proj = rng.normal(size=(48, 8)).astype(np.float32)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    bias = rng.normal(size=(2, 8)).astype(np.float32)
    k = image_size // 4
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (mean, "mean"), (std, "std"), (np.asarray(255, np.float32), "c255"), (proj, "proj"), (w, "w"),
        (bias, "bias"), (np.asarray(100, np.float32), "scale"), (np.asarray([0, 48], np.int64), "shape48"),
    ]]
    nodes = [
        helper.make_node("Cast", ["pixels"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["xf", "c255"], ["x01"]),
        helper.make_node("Sub", ["x01", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["xn"]),
        helper.make_node("AveragePool", ["xn"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),  # (N,3,4,4)
        helper.make_node("Reshape", ["pooled", "shape48"], ["flat"]),
        helper.make_node("MatMul", ["flat", "proj"], ["f"]),
        helper.make_node("ReduceL2", ["f"], ["fn"], axes=[1], keepdims=1),
        helper.make_node("Div", ["f", "fn"], ["features"]),
        helper.make_node("MatMul", ["features", "w"], ["lw"]),
        helper.make_node("Mul", ["lw", "scale"], ["ls"]),
        helper.make_node("Gather", ["bias", "task_index"], ["b"], axis=0),
        helper.make_node("Add", ["ls", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_image",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, image_size, image_size]),
         helper.make_tensor_value_info("task_index", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, d / "image_0.onnx")
    sha = hashlib.sha256((d / "image_0.onnx").read_bytes()).hexdigest()
    manifest = {
        "format": "clipheads-bundle", "format_version": 1,
        "backbone": {"arch": "tiny-test", "pretrained": "none"},
        "preprocess": {"image_size": image_size, "mean": mean.ravel().tolist(), "std": std.ravel().tolist(),
                       "resize": "shortest:bicubic", "crop": "center", "input_dtype": "uint8"},
        "graphs": {"image_0.onnx": {"sha256": sha}},
        "tasks": [{"name": "shape", "classnames": list(TASKS["shape"]), "graph": "image_0.onnx", "task_index": 0,
                   "logit_slice": [0, 5]},
                  {"name": "color", "classnames": list(TASKS["color"]), "graph": "image_0.onnx", "task_index": 1,
                   "logit_slice": [5, 8]}],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, {"proj": proj, "w": w, "bias": bias, "mean": mean, "std": std, "k": k}


def test_onnx_bundle_scores_match_numpy_reference(corpus, small, tmp_path):
    pytest.importorskip("onnxruntime")
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.scoring.cli import main

    bundle, p = _tiny_bundle(tmp_path / "bundle")
    root = corpus[0]
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{root / q}\n" for q in small))
    out = tmp_path / "onnx.parquet"
    assert main([str(bundle), "--input", str(lst), "--output", str(out), "--runtime", "onnx-cpu", "--top-k", "10",
                 "--embeddings", "--batch-size", "8", "--no-progress"]) == 0
    t = _read(out)
    spec = DecodeSpec.from_preprocess(json.loads((bundle / "manifest.json").read_text())["preprocess"])
    px = np.stack([decode_image((root / q).read_bytes(), spec) for q in small]).astype(np.float32)
    x = (px / 255 - p["mean"]) / p["std"]
    k = p["k"]
    pooled = x.reshape(len(x), 3, 4, k, 4, k).mean(axis=(3, 5)).reshape(len(x), 48)
    f = pooled @ p["proj"]
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(t.column("embedding").to_pylist()), f, atol=1e-5)
    for ti, (task, (a, b)) in enumerate({"shape": (0, 5), "color": (5, 8)}.items()):
        logits = 100 * f @ p["w"][:, a:b] + p["bias"][ti, a:b]  # the task's own bias row (task_index)
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        assert t.column(f"{task}.label").to_pylist() == [TASKS[task][i] for i in probs.argmax(1)]
        np.testing.assert_allclose(np.asarray(t.column(f"{task}.top_scores").to_pylist()),
                                   -np.sort(-probs, axis=1), atol=1e-4)
    # a tampered graph is refused (sha256 in the manifest) with exit code 2, nothing written
    (bundle / "image_0.onnx").write_bytes((bundle / "image_0.onnx").read_bytes() + b"\0")
    assert main([str(bundle), "--input", str(lst), "--output", str(tmp_path / "x.parquet"), "--no-progress"]) == 2
    assert not (tmp_path / "x.parquet").exists()


def test_memory_stays_flat_on_a_large_listing(head_file, tmp_path):
    """Listed files that all fail (missing): listing, shards, error records and the errors file
    are streamed, so Python's peak allocation for 40,000 inputs is that for 4,000 (not 10x)."""
    import tracemalloc

    import pyarrow as pa

    from clipheads.serving.runtimes import open_runtime
    from clipheads.serving.scoring import score

    rt = open_runtime(head_file, "torch")  # model + imports are outside the measurement
    peaks = {}
    for n in (4_000, 40_000):
        lst = tmp_path / f"many{n}.parquet"
        pq.write_table(pa.table({"path": [f"missing/dir{i % 100:03d}/file{i:07d}.jpg" for i in range(n)]}), lst)
        out = tmp_path / f"o{n}.parquet"
        tracemalloc.start()
        try:
            s = score(_job(head_file, lst, out, shard_size=1024, workers=2), runtime=rt)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (s.scored, s.failed, s.errors_total) == (0, n, n)
        with open(out / "_errors.jsonl") as f:
            assert sum(1 for _ in f) == n
    # holding 36,000 more error records and names alone would add > 15 MB of Python objects
    assert peaks[40_000] < peaks[4_000] + 4 * 2**20, {k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}


def test_crash_between_part_and_manifest_is_recomputed_once(head_file, corpus, small, tmp_path):
    """A crash after a part's rename but before the manifest lists it (and a stray temp file) must
    not leave that part counted twice: the resume sweeps and recomputes exactly that shard."""
    from clipheads.serving.scoring import score

    root = corpus[0]
    lst = tmp_path / "l.csv"
    lst.write_text("path\n" + "".join(f"{root / p}\n" for p in small))
    out = tmp_path / "o.parquet"
    score(_job(head_file, lst, out, shard_size=6))  # shards of 6, 6, 6, 2
    m = json.loads((out / "_manifest.json").read_text())
    dropped = m["shards"].pop("00002")
    m["complete"] = False
    (out / "_manifest.json").write_text(json.dumps(m))
    (out / ".part-00003.parquet.tmp-4242").write_bytes(b"half a file")
    kept = {k: (out / v["file"]).stat().st_mtime_ns for k, v in m["shards"].items()}
    s = score(_job(head_file, lst, out, shard_size=6))
    assert (s.shards_committed, s.shards_skipped, s.scored) == (1, 3, dropped["rows"])
    assert {k: (out / v["file"]).stat().st_mtime_ns for k, v in m["shards"].items()} == kept
    t = _read(out)
    assert t.column("index").to_pylist() == list(range(len(small)))
    assert not list(out.glob(".*tmp-*"))
