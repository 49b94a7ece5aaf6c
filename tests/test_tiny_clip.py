"""The packaged tiny CLIP: loads offline through open_clip, matches its sha256, and really learned."""
from __future__ import annotations

import json

import pytest
import torch

from clipheads.training import pretrain
from clipheads.training.data import synth

WEIGHTS = pretrain.WEIGHTS_DIR / f"{pretrain.ARCH}.safetensors"
SHA_FILE = pretrain.WEIGHTS_DIR / f"{pretrain.ARCH}.sha256"
CONFIG = pretrain.CONFIG_DIR / f"{pretrain.ARCH}.json"

needs_weights = pytest.mark.skipif(not WEIGHTS.exists(), reason=f"packaged weights not built yet ({WEIGHTS}); see training/pretrain.py")


def test_config_is_a_standard_open_clip_vit():
    import open_clip
    from open_clip.transformer import ResidualAttentionBlock

    cfg = json.loads(CONFIG.read_text())
    assert cfg["text_cfg"]["vocab_size"] == 49408 and cfg["text_cfg"]["context_length"] == 32
    pretrain.register_tiny_config()
    assert pretrain.ARCH in open_clip.list_models()
    model = open_clip.create_model(pretrain.ARCH, pretrained=None)
    assert all(isinstance(b, ResidualAttentionBlock) for b in model.visual.transformer.resblocks)
    assert all(isinstance(b, ResidualAttentionBlock) for b in model.transformer.resblocks)
    tokens = open_clip.get_tokenizer(pretrain.ARCH)(["a photo of a star."])
    assert tokens.shape == (1, 32)
    # fp16 safetensors of the full state dict must stay small enough to ship in the package
    assert 2 * sum(t.numel() for t in model.state_dict().values()) <= 15e6


@needs_weights
def test_packaged_weights_match_recorded_sha256():
    from clipheads.training.files import file_sha256

    recorded = SHA_FILE.read_text().split()[0]
    assert len(recorded) == 64
    assert file_sha256(WEIGHTS) == recorded
    assert WEIGHTS.stat().st_size <= 15e6


@needs_weights
def test_loads_offline_with_open_clip(monkeypatch):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pretrain.register_tiny_config()
    model = open_clip.create_model(pretrain.ARCH, pretrained=str(WEIGHTS), require_pretrained=True)
    fresh = open_clip.create_model(pretrain.ARCH, pretrained=None)
    # the weights really replaced the random init
    assert not torch.equal(model.visual.conv1.weight, fresh.visual.conv1.weight)
    assert model.logit_scale.exp().item() > fresh.logit_scale.exp().item() + 1  # the temperature was learnt


@pytest.fixture(scope="module")
def probe():
    """A fresh in-memory set (a seed no world or pool uses): 2 images per (domain, class)."""
    pretrain.register_tiny_config()
    model, tokenizer, preprocess = pretrain.load_tiny(WEIGHTS)
    images, attrs = [], []
    for d in synth.DOMAINS:
        for ci, c in enumerate(synth.CLASSES):
            for i in range(2):
                inst = synth.sample_instance(d, c, (424242, synth.DOMAINS.index(d), ci, i))
                images.append(preprocess(synth.render(inst, 64)))
                attrs.append([synth.DOMAINS.index(d), ci])
    return model, tokenizer, torch.stack(images), torch.tensor(attrs)


@needs_weights
def test_zero_shot_far_above_chance(probe):
    torch.set_num_threads(2)
    model, tokenizer, images, attrs = probe
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = pretrain.text_features(model, tokenizer, [pretrain.ZS_TEMPLATE.format(c.replace("_", " ")) for c in synth.CLASSES])
    correct = ((img @ txt.t()).argmax(1) == attrs[:, 1]).float()
    chance = 1 / len(synth.CLASSES)
    held = torch.tensor([(synth.DOMAINS[d], synth.CLASSES[c]) in pretrain.holdout_combos() for d, c in attrs.tolist()])
    seen_acc = correct[~held].mean().item()
    # measured on the shipped weights: see training/weights/MODEL_CARD.md; thresholds leave a margin
    assert seen_acc >= 8 * chance, f"seen-combo zero-shot {seen_acc:.3f}"
    assert correct.mean().item() >= 5 * chance
    for di, d in enumerate(synth.DOMAINS):
        assert correct[attrs[:, 0] == di].mean().item() >= 3 * chance, d


@needs_weights
def test_caption_attributes_are_read(probe):
    """Style and colour words matter to the text tower: the true style wins over the others."""
    model, tokenizer, images, attrs = probe
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        prompts = [f"a {synth.DOMAIN_WORDS[d]} of a {c.replace('_', ' ')}." for d in synth.DOMAINS for c in synth.CLASSES]
        txt = pretrain.text_features(model, tokenizer, prompts).view(len(synth.DOMAINS), len(synth.CLASSES), -1)
    # score each image against its own class under each style
    per_style = torch.einsum("ne,dne->nd", img, txt[:, attrs[:, 1]])
    style_acc = (per_style.argmax(1) == attrs[:, 0]).float().mean().item()
    assert style_acc >= 2 / len(synth.DOMAINS), style_acc


def test_holdout_design():
    held = pretrain.holdout_combos()
    sketch = {c for d, c in held if d == "sketch"}
    assert len(sketch) == len(synth.CLASSES) // 2
    assert {d for d, _ in held} <= set(synth.DOMAINS) and ("photo", "star") not in held
    jobs = pretrain.train_jobs(pretrain.PretrainConfig(per_combo=1), 48)
    assert not {(j[0], j[1]) for j in jobs} & held
    assert len(jobs) == (len(synth.DOMAINS) * len(synth.CLASSES) - len(held)) * len(synth.COLOURS)


def test_multi_positive_loss_prefers_true_pairs():
    torch.manual_seed(0)
    keys = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 2]])
    caps = [pretrain.Caption("a photo of a circle.", (("classname", 0),)),
            pretrain.Caption("a photo of a triangle.", (("classname", 1),))]
    pos = pretrain.positives(keys, caps)
    assert pos.tolist() == [[True, False], [False, True], [True, False]]
    txt = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    aligned = txt[[0, 1, 0]]
    scale = torch.tensor(3.0)
    good = pretrain.multi_positive_clip_loss(aligned, txt, pos, scale)
    bad = pretrain.multi_positive_clip_loss(txt[[1, 0, 1]], txt, pos, scale)
    assert good < bad


@needs_weights
def test_report_command_writes_report_and_card(tmp_path):
    """`python -m clipheads.training.pretrain report` (tiny_report.py) on a small world, no CoOp runs:
    the report and the model card are written, name the shipped weights, and show the hold-out design
    (held-out combinations zero-shot worse than seen ones)."""
    # the report scores the test split only: the small world's 6 test images per (domain, class), no train/val
    world = synth.generate_world(tmp_path / "world", seed=3, size=synth.WorldSize(train=0, val=0, test=6),
                                 progress=False)
    out, card = tmp_path / "report", tmp_path / "MODEL_CARD.md"
    rc = pretrain.main(["report", "--weights", str(WEIGHTS), "--out", str(out), "--world", str(world),
                        "--coop-seeds", "", "--card", str(card)])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert r["sha256"] == SHA_FILE.read_text().split()[0]
    zs = r["zero_shot"]
    assert zs["all"] >= 5 * r["chance"] and zs["held_out"] < zs["seen"], zs
    assert set(r["attribute_diagnosis"]) == {"shape", "colour", "size", "style"}
    assert "coop_heldout" not in r and f"{zs['photo']['all']:.1%}" in (out / "README.md").read_text()
    assert r["sha256"] in card.read_text()
