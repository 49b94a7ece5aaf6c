"""serving/runtimes/torch_folded.py: the folded PyTorch runtime equals the eager head runtime (CPU, fp32);
on a GPU, fp16 + CUDA graphs stay within the export gate's fp16 tolerances."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_backbone


def _head(tmp_path: Path, method: str) -> Path:
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods import TaskSpec, build_method

    bb = make_backbone("test-vit-micro", seed=0)
    ckpt = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(ckpt))
    bb = load_backbone("test-vit-micro", str(ckpt))
    tasks = [TaskSpec("color", ("red", "green", "blue")), TaskSpec("shape", ("circle", "square", "triangle", "star"))]
    head = build_method(method, bb, tasks, {})
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking prompts, different per task where the method has them
        for p in head.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return save_head(head, tmp_path / f"{method}.head.safetensors")


@pytest.mark.parametrize("method", ["zeroshot", "coop", "mmap"])
def test_folded_runtime_matches_the_eager_runtime(method, tmp_path):
    from clipheads.serving.runtimes import TorchRuntime, open_runtime
    from clipheads.serving.runtimes.torch_folded import FoldedTorchRuntime

    head = _head(tmp_path, method)
    eager = TorchRuntime(head, device="cpu")
    folded = open_runtime(head, "torch-folded", device="cpu")
    assert isinstance(folded, FoldedTorchRuntime) and folded.name == "torch-folded-cpu-fp32"
    folded.warmup()
    px = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    want, got = eager.classify(px), folded.classify(px)
    assert set(want) == set(got) == {"color", "shape"}
    for task in want:
        np.testing.assert_allclose(got[task], want[task], atol=1e-4, rtol=1e-4)
    texts = ["a photo of a cat.", "a dog"]
    np.testing.assert_allclose(folded.encode_texts(texts), eager.encode_texts(texts), atol=1e-5)


def test_folded_runtime_refuses_heads_that_do_not_fold(tmp_path):
    from clipheads.serving.runtimes import RuntimeError_, TorchRuntime, open_runtime

    head = _head(tmp_path, "cocoop")
    with pytest.raises(RuntimeError_, match="not foldable"):
        open_runtime(head, "torch-folded")
    assert isinstance(open_runtime(head, "auto"), TorchRuntime)  # auto falls back to eager


def test_batch_buckets():
    from clipheads.serving.runtimes.torch_folded import bucket

    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]


@pytest.mark.gpu
def test_fp16_cuda_graphs_within_the_fp16_gate(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from clipheads.serving.runtimes import TorchRuntime
    from clipheads.serving.runtimes.torch_folded import FoldedTorchRuntime

    head = _head(tmp_path, "mmap")
    ref = TorchRuntime(head, device="cpu")
    fast = FoldedTorchRuntime(head, device="cuda")
    assert fast.precision == "fp16" and fast.cuda_graphs
    for n in (1, 3, 8):  # padded to 1, 4, 8: three captured graphs per path
        px = np.random.default_rng(n).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        for p in range(len(fast.paths)):  # task p's image path in both runtimes
            fw, fg = ref.run_path(p, px)[1], fast.run_path(p, px)[1]
            cos = (fw * fg).sum(1) / (np.linalg.norm(fw, axis=1) * np.linalg.norm(fg, axis=1))
            assert cos.min() >= 0.999
        want, got = ref.classify(px), fast.classify(px)
        for task in want:
            assert (want[task].argmax(1) == got[task].argmax(1)).mean() >= 0.995
