"""Every file clipheads writes follows the process umask (0644 files / 0755 directories under
the usual 022), so a container running as another user (BentoML's image runs as `bentoml`)
can read mounted heads, bundles and outputs. Libraries create some files private (safetensors
0600, tempfile.mkdtemp 0700): each writer is checked under umask 022 and 027.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_backbone


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Mode bits of root and everything under it, by relative path."""
    out = {".": root.stat().st_mode & 0o777}
    for p in root.rglob("*"):
        out[p.relative_to(root).as_posix()] = p.stat().st_mode & 0o777
    return out


def _assert_umask_modes(root: Path, mask: int) -> None:
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    got = _modes(root) if root.is_dir() else {root.name: root.stat().st_mode & 0o777}
    want = {k: (want_dir if (root / k if k != "." else root).is_dir() else want_file) for k in got} \
        if root.is_dir() else {root.name: want_file}
    assert {k: oct(v) for k, v in got.items()} == {k: oct(v) for k, v in want.items()}


@pytest.fixture(scope="module")
def head_bits():
    from clipheads.training.methods.base import TaskSpec, build_method

    bb = make_backbone("test-vit-micro", seed=0)
    return build_method("zeroshot", bb, [TaskSpec("color", ("red", "green"))], {})


def test_head_file(head_bits, tmp_path, umask):
    from clipheads.training.artifact import save_head

    _assert_umask_modes(save_head(head_bits, tmp_path / "h.head.safetensors"), umask)


def test_bundle_directory(tmp_path, umask):
    from clipheads.export.bundle import add_file, write_bundle

    src = tmp_path / "graph.bin"
    src.write_bytes(b"\0" * 16)
    out = write_bundle(tmp_path / "b.bundle", {"tasks": []}, {"image.bin": src})
    add_file(out, {"graphs": {}}, "engine.plan", src)
    _assert_umask_modes(out, umask)


def test_scoring_output(tmp_path, umask):
    import pyarrow as pa

    from clipheads.serving.scoring.listing import InputItem, Shard
    from clipheads.serving.scoring.shards import ShardStore

    store = ShardStore(tmp_path / "out.parquet", {"shard_size": 2})
    shard = Shard(0, 0, (InputItem(0, "a.png", "/x/a.png"), InputItem(1, "b.png", "/x/b.png")))
    store.commit(shard, pa.table({"index": [0], "path": ["a.png"]}), [{"index": 1, "path": "b.png", "kind": "k", "detail": "d"}])
    store.write_errors_file(tmp_path / "out.parquet" / "_errors.jsonl")
    _assert_umask_modes(tmp_path / "out.parquet", umask)


def test_task_directory(tmp_path, umask):
    from clipheads.serving.tasks import open_task_store

    s = open_task_store(str(tmp_path / "tasks"), "id")
    keys = np.eye(2, 4, dtype=np.float32)
    s.add("t", ["a", "b"], keys, np.array([0, 1]), keys)
    s.add("t", ["a", "b"], keys, np.array([1, 0]), keys, replace=True)
    _assert_umask_modes(tmp_path / "tasks", umask)


def test_pretrained_weights(tmp_path, umask):
    from clipheads.training.pretrain import save_weights

    bb = make_backbone("test-vit-micro", seed=0)
    path = tmp_path / "w.safetensors"
    save_weights(bb.model, path, {"arch": "test-vit-micro"})
    _assert_umask_modes(path, umask)


def test_model_store_copies(head_bits, tmp_path, umask, monkeypatch):
    """A head written 0600 (by an older clipheads) is stored readable: copies take the umask's mode."""
    pytest.importorskip("bentoml")
    from clipheads.training.artifact import save_head
    from clipheads.serving.model_store import resolve_source, save

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    head = save_head(head_bits, tmp_path / "h.head.safetensors")
    os.chmod(head, 0o600)
    stored = resolve_source(save(head, name="modes"))
    _assert_umask_modes(stored, umask)
