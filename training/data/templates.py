"""Hand-crafted zero-shot templates, as tables (data, not code).

Why these exact strings: every base-to-novel paper reuses CoOp's per-dataset template for the
"CLIP" baseline and for initialising/teaching prompts (METHODS.md §1), so a different wording
would shift every zero-shot number. Sources: CoOp `trainers/zsclip.py` (CUSTOM_TEMPLATES,
ZeroshotCLIP2), `trainers/imagenet_templates.py` (the CLIP ImageNet notebook's 80 templates and
the 7 selected ones), COMMA `trainers/comma.py` (teacher templates; DTD differs).
"""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

DEFAULT_TEMPLATE = "a photo of a {}."

# Canonical (Dassl) dataset name -> CoOp's single template.
COOP_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
})

# COMMA's frozen-teacher templates: CoOp's table except DescribableTextures.
COMMA_TEACHER_TEMPLATES: Mapping[str, str] = MappingProxyType({
    **COOP_TEMPLATES,
    "DescribableTextures": "a photo of a {}, a type of texture.",
})

# The 80 templates of the CLIP "Prompt Engineering for ImageNet" notebook, in its order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 templates CoOp's ZeroshotCLIP2 ensembles (a subset of the 80).
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Our reader names (and other spellings) -> the Dassl name used as key above.
_ALIASES: Mapping[str, str] = MappingProxyType({
    "oxfordpets": "OxfordPets",
    "pets": "OxfordPets",
    "oxfordflowers": "OxfordFlowers",
    "flowers": "OxfordFlowers",
    "flowers102": "OxfordFlowers",
    "fgvcaircraft": "FGVCAircraft",
    "aircraft": "FGVCAircraft",
    "describabletextures": "DescribableTextures",
    "dtd": "DescribableTextures",
    "eurosat": "EuroSAT",
    "stanfordcars": "StanfordCars",
    "cars": "StanfordCars",
    "food101": "Food101",
    "sun397": "SUN397",
    "caltech101": "Caltech101",
    "ucf101": "UCF101",
    "imagenet": "ImageNet",
    "imagenetsketch": "ImageNetSketch",
    "imagenetv2": "ImageNetV2",
    "imageneta": "ImageNetA",
    "imagenetr": "ImageNetR",
})

KINDS = ("single", "ensemble", "select", "comma_teacher")


def canonical_dataset_name(name: str) -> str | None:
    """'oxford_pets', 'OxfordPets', 'imagenet-v2' -> the Dassl name; None if not a CoOp dataset."""
    return _ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def templates_for(dataset_name: str, kind: str = "single") -> tuple[str, ...]:
    """Templates a zero-shot classifier for `dataset_name` should average over.

    single: CoOp's per-dataset template (default "a photo of a {}." for unknown datasets);
    ensemble: the 80 ImageNet templates; select: the 7 of ZeroshotCLIP2 plus the dataset's own
    template for every dataset except ImageNet (as ZeroshotCLIP2 does); comma_teacher: COMMA's
    teacher template.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown template kind {kind!r}; known: {', '.join(KINDS)}")
    key = canonical_dataset_name(dataset_name)
    if kind == "ensemble":
        return IMAGENET_TEMPLATES
    if kind == "select":
        own = COOP_TEMPLATES.get(key, DEFAULT_TEMPLATE) if key else DEFAULT_TEMPLATE
        return IMAGENET_TEMPLATES_SELECT if key == "ImageNet" else IMAGENET_TEMPLATES_SELECT + (own,)
    table = COMMA_TEACHER_TEMPLATES if kind == "comma_teacher" else COOP_TEMPLATES
    return (table.get(key, DEFAULT_TEMPLATE) if key else DEFAULT_TEMPLATE,)
