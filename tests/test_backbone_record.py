"""The activation rule, the backbone record in heads, and reopening a head's backbone (tiny models).

Issue 14.1: QuickGELU on every path, mismatches refused with the fix; issue 15.4: a head whose
weights moved opens with `--pretrained NEWPATH` (sha256-checked), on every command that opens heads.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import _register_test_configs
from reference_clip import keep_global_rng  # noqa: F401 (autouse: weights drawn here leave the global RNG alone)
from test_foundation import _rewrite_meta, make_colour_folder

from clipheads.training.artifact import ArtifactError, load_head, save_head
from clipheads.training.backbone import BackboneError, load_backbone, resolve_request
from clipheads.training.methods import TaskSpec, build_method

MICRO = "test-vit-micro"


# ---- the activation rule (resolution only: no weights are read) ---------------------------------
def test_the_packaged_weights_refuse_another_activation():
    """The packaged tiny CLIP's file carries no activation record, but it was trained with GELU:
    `--act quickgelu` would run it unfaithfully (it scored 0.7 points off), so it is refused."""
    from clipheads.training.backbone import PACKAGED_ACT, PACKAGED_ARCH

    assert resolve_request(PACKAGED_ARCH, None, None).act == PACKAGED_ACT == "gelu"
    assert resolve_request(PACKAGED_ARCH, None, "gelu").act == "gelu"
    with pytest.raises(BackboneError, match="trained with gelu"):
        resolve_request(PACKAGED_ARCH, None, "quickgelu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_its_own_error():
    """Not the missing-weights advice open_clip's failure used to turn into."""
    from clipheads.training.fit import resolve_device

    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for bad, says in (("cuda", "no CUDA device here"), ("cuda:1", "no CUDA device here"), ("tpu", "unknown device")):
        with pytest.raises(BackboneError, match=says):
            resolve_device(bad)


@pytest.mark.parametrize("arch, pretrained, act, want", [
    ("ViT-B-16", "openai", None, "quickgelu"),  # the tag's config says QuickGELU; open_clip 3.3 would build GELU
    ("ViT-B-32", "openai", None, "quickgelu"),
    ("RN50", "openai", None, "quickgelu"),
    ("RN50", "cc12m", None, "quickgelu"),
    ("ViT-B-16-quickgelu", "openai", None, "quickgelu"),
    ("ViT-B-16", "laion2b_s34b_b88k", None, "gelu"),
    ("ViT-B-16", "none", None, "gelu"),
    ("ViT-B-16-quickgelu", "none", None, "quickgelu"),
])
def test_activation_follows_the_weights(arch, pretrained, act, want):
    assert resolve_request(arch, pretrained, act).act == want


@pytest.mark.parametrize("arch, pretrained, act, message", [
    ("ViT-B-16", "openai", "gelu", "drop --act gelu"),
    ("ViT-B-16", "laion2b_s34b_b88k", "quickgelu", "need GELU: drop --act quickgelu"),
    ("ViT-B-16-quickgelu", "laion2b_s34b_b88k", None, "need GELU: use --backbone ViT-B-16"),
    ("ViT-B-16-quickgelu", "none", "gelu", "choose one"),
])
def test_activation_mismatch_is_an_error_with_the_fix(arch, pretrained, act, message):
    with pytest.raises(BackboneError, match="activation mismatch") as err:
        resolve_request(arch, pretrained, act)
    assert message in str(err.value)


def test_a_plain_local_file_must_state_the_activation(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"\0" * 16)
    for arch in ("ViT-B-16", "RN50"):  # both have QuickGELU weights, open_clip builds GELU
        with pytest.raises(BackboneError, match="say which activation"):
            resolve_request(arch, str(f))
    assert resolve_request("ViT-B-16", str(f), "quickgelu").act == "quickgelu"
    assert resolve_request("ViT-B-16-quickgelu", str(f)).act == "quickgelu"
    assert resolve_request("ViT-B-16", str(f), "gelu").act == "gelu"
    _register_test_configs()
    assert resolve_request(MICRO, str(f)).act == "gelu"  # no QuickGELU weights exist: nothing to confuse


def _hub_repo(hf_cache, repo: str, arch_cfg: dict, quick_gelu: bool, weights: dict):
    from safetensors.torch import save_file

    rev = "f" * 40
    root = hf_cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**arch_cfg, "quick_gelu": quick_gelu}}))
    save_file(weights, str(snap / "open_clip_model.safetensors"))


def test_hf_hub_config_decides_the_activation(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    import open_clip

    _register_test_configs()
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    cfg = open_clip.get_model_config(MICRO)
    weights = open_clip.create_model(MICRO, pretrained=None).state_dict()
    _hub_repo(tmp_path, "someone/micro-quick", cfg, True, weights)
    bb = load_backbone(MICRO, "hf-hub:someone/micro-quick")
    assert bb.act == "quickgelu" and bb.arch == "hf-hub:someone/micro-quick" and bb.weights_sha256
    with pytest.raises(BackboneError, match="activation mismatch"):
        load_backbone(MICRO, "hf-hub:someone/micro-quick", act="gelu")


# ---- the record and its checks ----------------------------------------------------------------
@pytest.fixture()
def micro_head(tmp_path):
    """A CoOp head trained-for (not trained: untouched tensors suffice) a local micro checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    _register_test_configs()
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpts" / "micro.safetensors"
    ckpt.parent.mkdir()
    save_file(open_clip.create_model(MICRO, pretrained=None).state_dict(), str(ckpt))
    bb = load_backbone(MICRO, str(ckpt))
    head = build_method("coop", bb, [TaskSpec("colours", ("red", "green", "blue"))], {"n_ctx": 2})
    return save_head(head, tmp_path / "colours.head.safetensors"), ckpt


def test_head_records_what_defines_the_forward(micro_head):
    path, ckpt = micro_head
    rec = load_head(path).backbone
    assert rec["act"] == "gelu" and rec["image_size"] == 32 and rec["context_length"] == 24
    assert rec["pretrained"] == str(ckpt) and len(rec["weights_sha256"]) == 64 and len(rec["structure_sha256"]) == 64


def test_a_backbone_with_another_forward_is_refused(micro_head, tmp_path):
    path, ckpt = micro_head
    quick = load_backbone(MICRO, str(ckpt), act="quickgelu")  # same file, other activation
    with pytest.raises(ArtifactError, match="activation GELU vs QuickGELU"):
        load_head(path).build(quick)

    def grow(meta, tensors):
        meta["backbone"]["image_size"] = 64

    with pytest.raises(BackboneError, match="image_size 64 vs 32"):
        load_head(_rewrite_meta(path, tmp_path / "big.head.safetensors", grow)).build()


def test_moved_weights_need_and_accept_the_override(micro_head, tmp_path):
    path, ckpt = micro_head
    moved = tmp_path / "elsewhere" / "micro.safetensors"
    moved.parent.mkdir()
    shutil.move(ckpt, moved)
    with pytest.raises(BackboneError, match="not there any more.*--pretrained NEWPATH"):
        load_head(path).build()
    said: list[str] = []
    head = load_head(path).build(weights_override=str(moved), log=said.append)
    assert head.backbone.weights_file == str(moved) and str(moved) in said[-1]
    other = tmp_path / "other.safetensors"
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file(open_clip.create_model(MICRO, pretrained=None).state_dict(), str(other))
    with pytest.raises(BackboneError, match="not the weights this head was trained on"):
        load_head(path).build(weights_override=str(other))


def test_every_cli_that_opens_a_head_takes_the_override(micro_head, tmp_path, capsys):
    from clipheads.export.cli import main as export_main
    from clipheads.training.cli import main

    path, ckpt = micro_head
    data = make_colour_folder(tmp_path / "colours", per_class=2)
    moved = tmp_path / "moved.safetensors"
    shutil.move(ckpt, moved)
    assert main(["eval", str(path), "--data", str(data), "--json"]) == 2
    assert "--pretrained NEWPATH" in capsys.readouterr().err
    assert main(["eval", str(path), "--data", str(data), "--pretrained", str(moved), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["backbone"]["weights_file"] == str(moved) and str(moved) in out.err
    bundle = tmp_path / "bundle"
    assert export_main([str(path), "--out", str(bundle), "--pretrained", str(moved), "--probes", "4", "--no-text"]) == 0
    assert str(moved) in capsys.readouterr().err
    assert json.loads((bundle / "manifest.json").read_text())["backbone"]["act"] == "gelu"
    assert export_main([str(path), "--out", str(tmp_path / "b2"), "--pretrained", str(path)]) == 2
    assert "not the weights this head was trained on" in capsys.readouterr().err


def test_legacy_heads_keep_their_activation_or_are_refused(micro_head, tmp_path):
    path, _ = micro_head

    def legacy(meta, tensors):  # what heads recorded before the activation was part of the record
        meta["backbone"] = {k: meta["backbone"][k] for k in ("arch", "pretrained", "weights_sha256")}

    old = _rewrite_meta(path, tmp_path / "old.head.safetensors", legacy)
    assert load_head(old).build().backbone.act == "gelu"

    def openai_legacy(meta, tensors):
        meta["backbone"] = {"arch": "ViT-B-16", "pretrained": "openai", "weights_sha256": None}

    old = _rewrite_meta(path, tmp_path / "old_openai.head.safetensors", openai_legacy)
    with pytest.raises(BackboneError, match="older clipheads .* mis-activated backbone. Retrain"):
        load_head(old).build()


def test_safetensors_weights_under_another_suffix_load(tmp_path):
    """open_clip picks its loader by the file's suffix: the packaged weights copied to `tiny.bin`
    load as safetensors (not through torch.load), give the same model and record the user's path."""
    from clipheads.training.backbone import PACKAGED_ARCH, PACKAGED_WEIGHTS

    copy = tmp_path / "tiny.bin"
    shutil.copyfile(PACKAGED_WEIGHTS, copy)
    bb = load_backbone(PACKAGED_ARCH, str(copy))
    ref = load_backbone(PACKAGED_ARCH, str(PACKAGED_WEIGHTS))
    assert bb.weights_file == str(copy) and bb.weights_sha256 == ref.weights_sha256
    for (k, a), (_, b) in zip(bb.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(a, b), k
