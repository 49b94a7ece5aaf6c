"""OpenAI's own CLIP code (PyPI `clip-anytorch`, test-only) as the oracle for our backbone loading.

`openai_clip()` imports it; its package `__init__` needs `pkg_resources` only for a torch version
comparison, and setuptools >= 81 no longer ships that module, so a stand-in exposing the real
`packaging` library is provided when (and only when) it is missing.

`random_openai_state_dict(arch)` makes OpenAI-format weights (open_clip's CLIP keys are OpenAI's)
that are hard to pass by accident: layer norms, batch norms and biases are perturbed away from
their 1/0 init, the MLP output projections are scaled x4 so each block's activation counts, and
every value is rounded to fp16, as OpenAI's released weights are (so OpenAI's `build_model`,
which casts to fp16 before loading, keeps them exactly).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

MLP_OUT_SCALE = 4.0
THRESHOLD = 1e-6  # 1 - cos, image and text features (issue 14)


def openai_clip():
    """The `clip` package (clip-anytorch), importable without pkg_resources."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    import clip

    return clip


def random_openai_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random-init OpenAI-format CLIP weights for open_clip architecture `arch` (module doc)."""
    import open_clip

    with torch.random.fork_rng():  # seeded here, the global RNG other tests rely on stays as it was
        torch.manual_seed(seed)
        sd = open_clip.create_model(arch, pretrained=None).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, t in sd.items():
        t = t.detach().clone()
        if t.is_floating_point():
            if name.endswith("running_var"):
                t = (1.0 + 0.2 * torch.randn(t.shape, generator=g)).abs() + 0.1
            elif name.endswith(("running_mean", ".bias")):
                t = t + 0.05 * torch.randn(t.shape, generator=g)
            elif t.ndim == 1 and name.endswith(".weight"):  # layer/batch norm scales
                t = t + 0.1 * torch.randn(t.shape, generator=g)
            elif name.endswith("mlp.c_proj.weight"):
                t = t * MLP_OUT_SCALE
            t = t.half().float()
        out[name] = t.contiguous()
    return out


def openai_model(state_dict: dict[str, torch.Tensor]):
    """OpenAI's CLIP built by OpenAI's `build_model` from the state dict, in fp32, eval mode."""
    clip = openai_clip()
    with torch.random.fork_rng():  # its constructor draws an init we overwrite; keep the global RNG
        model = clip.model.build_model({k: v.clone() for k, v in state_dict.items()})
    return model.float().eval()


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of 1 - cos(a_i, b_i), computed in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).max())


TEXTS = ("a photo of a cat.", "a blurry sketch of two small dogs on a red sofa")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def probe_pixels(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 images: what a bundle's image graph takes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def normalise(pixels_u8: torch.Tensor, mean, std) -> torch.Tensor:
    x = pixels_u8.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def reference_features(model, pixels: torch.Tensor, texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI's (image features, text features, tokens) for normalised pixels and texts."""
    clip = openai_clip()
    tokens = clip.tokenize(list(texts))
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens), tokens


def bundle_features(bundle, pixels_u8: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image features, text features) from a bundle's graphs, run by ONNX Runtime."""
    import onnxruntime as ort

    from clipheads.export.bundle import load_bundle

    b = load_bundle(bundle)
    (graph,) = b.image_graphs()
    sess = ort.InferenceSession(str(b.path(graph)), providers=["CPUExecutionProvider"])
    feed = {"pixels": pixels_u8}
    if "task_index" in {i.name for i in sess.get_inputs()}:
        feed["task_index"] = np.zeros((len(pixels_u8),), np.int64)
    img = sess.run(["features"], feed)[0]
    text = ort.InferenceSession(str(b.path(b.text_graph)), providers=["CPUExecutionProvider"])
    return img, text.run(["features"], {"tokens": tokens.astype(np.int64)})[0]


def save_fp16(state_dict: dict, path) -> Path:
    """Weights on disk in fp16 (exact: the values are fp16-rounded), as OpenAI ships them."""
    from safetensors.torch import save_file

    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in state_dict.items()}, str(path))
    return Path(path)


def openai_case(arch: str, directory, seed: int = 0) -> dict:
    """One architecture's fixture: random OpenAI-format weights saved as `directory/ARCH.safetensors`
    and OpenAI's features on fixed probes. Only the file and small tensors are kept (the state dict
    and OpenAI's model are freed), so a module- or session-scoped fixture holds little memory."""
    sd = random_openai_state_dict(arch, seed)
    weights = save_fp16(sd, Path(directory) / f"{arch}.safetensors")
    ref = openai_model(sd)
    del sd
    pixels = probe_pixels(2, ref.visual.input_resolution)
    ref_img, ref_txt, tokens = reference_features(ref, normalise(pixels, OPENAI_MEAN, OPENAI_STD))
    return {"arch": arch, "weights": weights, "pixels": pixels, "tokens": tokens, "ref": (ref_img, ref_txt)}


@pytest.fixture(autouse=True)
def keep_global_rng():
    """Import into a test module: its tests draw random weights without moving the global RNG
    that other modules' tests rely on."""
    with torch.random.fork_rng():
        yield
