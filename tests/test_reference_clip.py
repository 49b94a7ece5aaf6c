"""Our backbone loading reproduces OpenAI's CLIP code (clip-anytorch) on OpenAI-format weights.

Random weights hide activation mix-ups (GELU instead of QuickGELU moves 1 - cos by only ~1e-4
here), so the bound is 1e-6 and the weights are made so the activation shows (reference_clip.py);
`test_wrong_activation_fails_the_bound` proves the check catches GELU.

Cost on 2 cores: one random state dict per architecture (module-scoped; ViT-B/16's is shared with
test_reference_clip_cli.py), batch 2. The eager checks run full-size ViT-B/16, ViT-B/32 and RN50
from a local file, with the activation stated as a user would (`act=`, or a -quickgelu name). The
ONNX checks (the real export path) run reduced-depth models of the ViT-B/32 and RN50 geometry, as
what they test is the export plumbing; full-size ViT-B/16 ONNX is test_reference_clip_cli.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import _register_test_configs
from reference_clip import keep_global_rng  # noqa: F401 (autouse)
from reference_clip import (TEXTS, THRESHOLD, bundle_features, normalise, one_minus_cos, openai_case, openai_clip,
                            openai_model, probe_pixels, random_openai_state_dict, reference_features)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

# full-size open_clip arch -> how the user states the activation for a local file
FULL = {"ViT-B-16": {"act": "quickgelu"}, "ViT-B-32-quickgelu": {}, "RN50": {"act": "quickgelu"}}
REDUCED = ("test-ref-vit-b32-d2", "test-ref-rn50-d1")
MEASURED: dict = {}  # printed at the end of the module (the README table's numbers)


def _ours(arch: str, weights, **kw):
    from clipheads.training.backbone import load_backbone

    return load_backbone(arch, str(weights), **kw)


def _our_features(bb, pixels_u8: torch.Tensor, tokens: torch.Tensor):
    pre = bb.preprocess
    with torch.no_grad():
        return bb.encode_image(normalise(pixels_u8, pre.mean, pre.std)), bb.encode_text(tokens)


def _distances(case: dict, img, txt) -> tuple[float, float]:
    return one_minus_cos(img, case["ref"][0]), one_minus_cos(txt, case["ref"][1])


@pytest.fixture(scope="module", params=list(FULL), ids=lambda a: a.replace("-quickgelu", ""))
def full_case(request, tmp_path_factory):
    if request.param == "ViT-B-16":
        return {**request.getfixturevalue("openai_vitb16"), "arch": "ViT-B-16"}
    return openai_case(request.param, tmp_path_factory.mktemp("ref"))


def test_eager_features_match_openai(full_case):
    c = full_case
    bb = _ours(c["arch"], c["weights"], **FULL[c["arch"]])
    assert bb.act == "quickgelu" and bb.record()["act"] == "quickgelu"
    assert torch.equal(bb.tokenize(list(TEXTS)).long(), c["tokens"]), "tokenizer differs from OpenAI's"
    d = _distances(c, *_our_features(bb, c["pixels"], c["tokens"]))
    MEASURED[(c["arch"], "eager")] = d
    assert max(d) <= THRESHOLD, d


def test_wrong_activation_fails_the_bound(openai_vitb16):
    """The oracle can fail: the same ViT-B/16 weights run with GELU miss the bound by far."""
    bb = _ours("ViT-B-16", openai_vitb16["weights"], act="gelu")
    assert bb.act == "gelu"
    d = _distances(openai_vitb16, *_our_features(bb, openai_vitb16["pixels"], openai_vitb16["tokens"]))
    MEASURED[("ViT-B-16 run with GELU", "eager")] = d
    assert min(d) > 10 * THRESHOLD, d


# ---- exported fp32 ONNX (reduced depth) -------------------------------------------------------
def export_zero_shot_bundle(bb, out) -> dict:
    """A zero-shot head on `bb` through the real export path (default fp32 options)."""
    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.training.methods import TaskSpec, build_method

    head = build_method("zeroshot", bb, [TaskSpec("pets", ("cat", "dog"))])
    result = export_heads([head], out, ExportOptions(probes=4))
    assert result.passed and result.bundle is not None
    return result.manifest


@pytest.mark.parametrize("arch", REDUCED)
def test_exported_onnx_matches_openai(arch, tmp_path):
    _register_test_configs()
    c = openai_case(arch, tmp_path)
    bb = _ours(arch, c["weights"], act="quickgelu")
    manifest = export_zero_shot_bundle(bb, tmp_path / "bundle")
    assert manifest["backbone"]["act"] == "quickgelu" and manifest["backbone"]["weights_sha256"] == bb.weights_sha256
    img, txt = bundle_features(tmp_path / "bundle", c["pixels"].numpy(), c["tokens"].numpy())
    d = _distances(c, torch.from_numpy(img), torch.from_numpy(txt))
    MEASURED[(arch, "onnx")] = d
    assert max(d) <= THRESHOLD, d


# ---- OpenAI's TorchScript .pt -> clipheads convert ---------------------------------------------
def _torchscript_archive(sd: dict, path) -> None:
    """An archive in OpenAI's download format: a traced CLIP with its three integer attributes."""
    model = openai_model(sd)
    for name, value in (("input_resolution", model.visual.input_resolution), ("context_length", model.context_length),
                        ("vocab_size", model.vocab_size)):
        if name in vars(model):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    clip = openai_clip()
    size = model.visual.input_resolution
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.zeros(2, 3, size, size), clip.tokenize(["a", "b"])), check_trace=False)
    torch.jit.save(traced, str(path))


def test_openai_torchscript_is_refused_then_converted(tmp_path, capsys):
    from clipheads.training.backbone import BackboneError, load_backbone
    from clipheads.training.cli import main

    _register_test_configs()
    arch = "test-ref-vit-tiny"
    pt = tmp_path / "ViT-tiny.pt"
    _torchscript_archive(random_openai_state_dict(arch, seed=3), pt)
    with pytest.raises(BackboneError, match="clipheads convert .* --trust-torchscript"):
        load_backbone(arch, str(pt))  # never loaded implicitly
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(pt), "--out", str(out)]) == 2
    assert "TorchScript archive" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(pt), "--out", str(out), "--trust-torchscript", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["arch"], rec["act"]) == (arch, "quickgelu")
    # OpenAI's own loader reads the .pt; ours reads the converted file, no --act (the file records it)
    ref, _ = openai_clip().load(str(pt), device="cpu", jit=False)
    bb = load_backbone(arch, str(out))
    assert bb.act == "quickgelu" and "metadata" in bb.act_reason
    pixels = probe_pixels(2, 32)
    ref_img, ref_txt, tokens = reference_features(ref.eval(), normalise(pixels, bb.preprocess.mean, bb.preprocess.std))
    img, txt = _our_features(bb, pixels, tokens)
    assert max(one_minus_cos(img, ref_img), one_minus_cos(txt, ref_txt)) <= THRESHOLD
    with pytest.raises(BackboneError, match="activation mismatch"):
        load_backbone(arch, str(out), act="gelu")
    from conftest_data import write_images

    for cls in ("cat", "dog"):
        write_images(tmp_path / "pets" / cls, 1, ext="png")
    assert main(["train", "--backbone", arch, "--pretrained", str(pt), "--method", "coop", "--data",
                 str(tmp_path / "pets"), "--out", str(tmp_path / "x.head.safetensors")]) == 2
    assert "clipheads convert" in capsys.readouterr().err


def teardown_module(module):
    if MEASURED:
        print("\n1 - cos vs OpenAI CLIP (image, text):")
        for (arch, kind), (a, b) in MEASURED.items():
            print(f"  {arch:<24} {kind:<6} {a:.1e}  {b:.1e}")
