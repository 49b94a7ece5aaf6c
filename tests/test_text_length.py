"""Variable text length (issue 17.2): the used length gives the full context's features, in
PyTorch (every method with a learned text side) and in the exported text graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipheads.training.methods import TaskSpec, build_method
from clipheads.training.text_length import bucketed, text_length, trim_tokens, trimmed_text

ort = pytest.importorskip("onnxruntime")

LABELS = ("cat", "golden retriever", "a very long label with many words in it", "x")
TASK = (TaskSpec("t", LABELS, ("a photo of a {}.", "itap of the {}")),)


def test_text_length_keeps_every_pooled_position_and_buckets():
    tok = np.zeros((3, 77), np.int64)
    tok[0, :5] = [1, 7, 8, 9, 99]  # EOT (largest id) at 4
    tok[1, :12] = list(range(1, 12)) + [99]  # EOT at 11
    tok[2, :2] = [1, 99]
    assert text_length(tok) == 16 and text_length(torch.from_numpy(tok)) == 16
    assert trim_tokens(tok).shape == (3, 16) and (trim_tokens(tok)[:, :12] == tok[:, :12]).all()
    assert text_length(tok, "eos", eos_id=99) == 16
    assert text_length(tok, "first") == 8  # one token, rounded up to a bucket
    assert text_length(tok, "last") is None and text_length(tok, causal=False) is None
    full = np.zeros((1, 77), np.int64)
    full[0, 76] = 99  # a truncated label ends at the last position: the whole context
    assert text_length(full) == 77 and bucketed(75, 77) == 77 and bucketed(1, 77) == 8 and bucketed(9, 12) == 12


@pytest.mark.parametrize("method", ["zeroshot", "coop", "maple", "ivlp", "mma", "comma"])
def test_trimmed_class_matrix_equals_the_full_context(method, micro_backbone):
    torch.manual_seed(0)
    head = build_method(method, micro_backbone, TASK).eval()
    with torch.no_grad():
        for p in head.parameters():  # away from the init: learned context really differs per slot
            p.add_(torch.randn_like(p) * 0.05)
        full = head.text_features(LABELS, 0)
        with trimmed_text():
            trimmed = head.text_features(LABELS, 0)
    assert torch.abs(full - trimmed).max() <= 1e-5


def test_backbone_trims_only_when_asked_and_never_per_token_outputs(micro_backbone):
    bb = micro_backbone
    tok = bb.tokenize(["a photo of a cat.", "a dog"])
    assert bb.trimmed_length(tok) == 8 < tok.shape[1]
    with torch.no_grad():
        ref = bb.encode_text(tok)
        assert torch.abs(bb.encode_text(tok, trim=True) - ref).max() <= 1e-5
        assert torch.abs(bb.encode_text(tok[:, :8]) - ref).max() <= 1e-5  # shorter tokens are accepted
        with trimmed_text():
            _, last = bb.encode_text(tok, return_tokens=True)
    assert last.shape[1] == tok.shape[1]  # COMMA compares per-token outputs: the full context stays


def test_exported_text_graph_takes_any_length_with_the_full_contexts_features(micro_backbone, tmp_path):
    from clipheads.export.bundle import load_bundle
    from clipheads.export.pipeline import ExportOptions, export_heads

    head = build_method("zeroshot", micro_backbone, TASK)
    res = export_heads([head], tmp_path / "b", ExportOptions(probes=8))
    assert res.passed, res.parity["failures"]
    m = load_bundle(tmp_path / "b").manifest
    assert m["text"]["sequence"] == "dynamic" and m["text"]["pool"]["type"] == "argmax"
    assert m["graphs"]["text.onnx"]["inputs"][0]["shape"] == ["batch", "sequence"]
    assert res.parity["text"]["lengths"]["used"] < res.parity["text"]["lengths"]["full"]
    sess = ort.InferenceSession(str(tmp_path / "b" / "text.onnx"), providers=["CPUExecutionProvider"])
    tok = micro_backbone.tokenize([t.format(c) for c in LABELS for t in TASK[0].templates]).numpy()
    full = sess.run(None, {"tokens": tok})[0]
    need = text_length(tok, "argmax")
    for length in sorted({need, need + 3, tok.shape[1] - 1}):
        got = sess.run(None, {"tokens": tok[:, :length]})[0]
        assert np.abs(got - full).max() <= 1e-5, length
    with torch.no_grad():
        eager = micro_backbone.encode_text(torch.from_numpy(tok)).numpy()
    assert np.abs(full - eager).max() <= 1e-4


def test_a_fixed_length_text_graph_still_exports_and_says_so(micro_backbone, tmp_path):
    """What bundles before issue 17 hold: tokens (N, context_length); runtimes feed it the full context."""
    from clipheads.export.fold import TextEncoder
    from clipheads.export.onnx_export import export_text_graph, graph_io

    path = export_text_graph(TextEncoder(micro_backbone), tmp_path / "t.onnx", variable_length=False)
    assert graph_io(path)["inputs"][0]["shape"] == ["batch", micro_backbone.context_length]


def test_every_runtime_feeds_the_used_length_and_gets_the_full_contexts_features(tmp_path):
    """Zero-shot labels and few-shot registration reach the text tower through `encode_texts`:
    ONNX Runtime (bundle), eager and folded PyTorch (head file) all cut the call to its bucketed
    longest label, and give the full context's features."""
    from safetensors.torch import save_file

    from conftest import make_backbone

    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.serving.runtimes import OnnxRuntime, TorchRuntime
    from clipheads.serving.runtimes.torch_folded import FoldedTorchRuntime
    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone

    bb = make_backbone("test-vit-micro", seed=0)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = load_backbone("test-vit-micro", str(tmp_path / "w.safetensors"))
    head = build_method("zeroshot", bb, TASK)
    head_file = save_head(head, tmp_path / "zs.head.safetensors")
    assert export_heads([head], tmp_path / "b", ExportOptions(probes=8)).passed

    texts = [t.format(c) for c in LABELS[:2] for t in TASK[0].templates]  # short labels: 1 bucket
    tok = bb.tokenize(texts)
    used, ctx = bb.trimmed_length(tok), bb.context_length
    assert used < ctx
    with torch.no_grad():
        want = bb.encode_text(tok, trim=False).numpy()

    class Recorder:  # the real session; records what the runtime feeds it
        def __init__(self, sess):
            self.sess, self.lengths = sess, []

        def run(self, names, feed):
            self.lengths.append(feed["tokens"].shape[1])
            return self.sess.run(names, feed)

    ort_rt = OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"])
    ort_rt._text = rec = Recorder(ort_rt._text)
    got = ort_rt.encode_texts(texts)
    assert rec.lengths == [used] and np.abs(got - want).max() <= 1e-5

    for rt in (TorchRuntime(head_file, device="cpu"), FoldedTorchRuntime(head_file, device="cpu")):
        tower = (rt.head.backbone if isinstance(rt, TorchRuntime) else rt._backbone)._text.transformer
        seen = []
        hook = tower.resblocks[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[:2])))
        try:
            got = rt.encode_texts(texts)
        finally:
            hook.remove()
        assert len(seen) == 1 and used in seen[0] and ctx not in seen[0], (rt.name, seen)
        assert np.abs(got - want).max() <= 1e-5, rt.name
