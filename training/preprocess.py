"""The one preprocessing path: how an image becomes the pixels a backbone sees.

Every consumer goes through `prepare_pixels` (or, for training augmentation, `oriented_rgb`):
train-time loading, evaluation, the pixels a bundle's manifest describes, the HTTP server, batch
scoring and the Python `Predictor`. So an EXIF-rotated photo is upright everywhere, and a
palette PNG is composited the same way at training and at serving time.

    open_image(source)        file path, bytes, PIL image or numpy array -> a lazily opened PIL image
    prepare_pixels(img, spec) -> (3, S, S) uint8 (= open_image + pixels_from_image):
        1. JPEG draft decoding when the image is much larger than S (libjpeg's 1/2, 1/4, 1/8 DCT
           scaling, keeping >= 2x the target resolution: 4-10x faster on camera photos);
        2. EXIF orientation applied (`ImageOps.exif_transpose`);
        3. colour: palette and palette+alpha images via RGBA, everything else `convert("RGB")`;
        4. resize the short side to S (torchvision `Resize(int)` semantics: the long side keeps the
           aspect ratio, truncated), with the spec's filter; a two-step shrink for big inputs;
        5. center crop S x S (torchvision `CenterCrop` rounding).
    Normalisation (mean/std) happens after, in the graph or the runtime, so uint8 is what crosses
    process boundaries.

Size limits (bytes, pixels, aspect ratio) are the caller's: serving checks untrusted headers
before any of this runs; training caps pixels when it opens a file.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

# What the steps above are called in a head's / bundle's recorded preprocessing (`to_json`).
ORIENTATION = "exif"
COLOUR = "rgb"
DEFAULT_MAX_PIXELS = 40_000_000

FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


@dataclass(frozen=True)
class PreprocessSpec:
    """Exactly how pixels must be prepared; travels with every head and bundle."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # resize short side then center crop

    def to_json(self) -> dict:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": f"{self.resize_mode}:{self.interpolation}",
            "crop": "center",
            "orientation": ORIENTATION,
            "colour": COLOUR,
        }

    @classmethod
    def from_json(cls, d: dict) -> "PreprocessSpec":
        mode, _, interp = d.get("resize", "shortest:bicubic").partition(":")
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), interp or "bicubic", mode)


class ImageTooLarge(ValueError):
    """An image over the pixel cap (checked from the header, before decoding)."""


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image, opened lazily (a file or bytes: nothing decoded yet, so `prepare_pixels` can
    still pick JPEG draft decoding). Numpy arrays are (H, W, 3) or (H, W) RGB/grey, uint8 or
    floats in [0, 1]; they carry no EXIF."""
    if isinstance(source, Image.Image):
        img = _own_image(source)
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)):
        raw = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).expanduser()
        try:
            img = Image.open(raw)
        # Pillow's own refusal (> ~179 MP; > ~89 MP too where warnings are errors), before our cap
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageTooLarge(f"over Pillow's decompression-bomb limit (our cap: {max_pixels:,} pixels): {err}") from None
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}; "
                        "give a path, bytes, a PIL image or an (H, W, 3) numpy array")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} exceeds the {max_pixels:,}-pixel cap")
    return img


def _own_image(img: Image.Image) -> Image.Image:
    """The caller's image, left as it was: JPEG draft decoding shrinks an image object in place,
    so a not-yet-decoded JPEG is reopened from its file or bytes (same pixels as a path would give);
    a decoded image is only read."""
    if getattr(img, "format", None) != "JPEG" or getattr(img, "_im", None) is not None or not img.tile:
        return img
    if getattr(img, "filename", ""):
        return Image.open(img.filename)
    fp = getattr(img, "fp", None)
    if isinstance(fp, io.BytesIO):
        return Image.open(io.BytesIO(fp.getvalue()))
    return img.copy()  # decodes the caller's object once (no draft), changes nothing they see


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"numpy images are (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey; got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"numpy images are uint8 or floats in [0, 1]; got {a.dtype}")
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def jpeg_draft_size(w: int, h: int, size: int) -> tuple[int, int] | None:
    """Step 1: the size to ask libjpeg's draft mode for (it decodes at 1/2, 1/4 or 1/8 scale,
    keeping at least this), or None when the image is not much larger than `size`. Serving's
    decode budget counts pixels with the same rule."""
    if min(w, h) <= 4 * size:
        return None
    scale = 2 * size / min(w, h)  # keep >= 2x the target resolution
    return math.ceil(w * scale), math.ceil(h * scale)


def oriented_rgb(img: Image.Image, shrink_to: int | None = None) -> Image.Image:
    """Steps 1-3: draft decoding (only with `shrink_to`), EXIF orientation, RGB. Training's
    augmentation starts from this (full resolution: random crops may zoom in)."""
    if shrink_to and getattr(img, "format", None) == "JPEG":
        draft = jpeg_draft_size(img.width, img.height, shrink_to)
        if draft is not None:
            img.draft("RGB", draft)
    img = ImageOps.exif_transpose(img)  # loads the image
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    return img


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the short side becomes `size`, the long side keeps the aspect
    ratio (truncated), which is what open_clip's eval transform does."""
    if w <= h:
        return size, max(size, int(size * h / w))
    return max(size, int(size * w / h)), size


def prepare_pixels(source: ImageSource, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image -> (3, S, S) uint8 pixels, the one way every part of clipheads does it.

    `spec`: a PreprocessSpec, or anything with `image_size` and `interpolation` (serving's DecodeSpec)."""
    return pixels_from_image(open_image(source, max_pixels), int(spec.image_size), spec.interpolation)


def pixels_from_image(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Steps 1-5 on an opened (ideally not yet decoded) PIL image -> (3, S, S) uint8. Serving calls
    this after its own header checks on untrusted bytes (serving/images.py `decode_image`)."""
    img = oriented_rgb(img, shrink_to=size)
    rw, rh = resized_size(img.width, img.height, size)
    if (rw, rh) != img.size:
        gap = 3.0 if min(img.size) > 3 * size else None  # fast two-step shrink for big inputs
        img = img.resize((rw, rh), FILTERS.get(interpolation, Image.Resampling.BICUBIC), reducing_gap=gap)
    if (rw, rh) != (size, size):
        left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)  # (S, S, 3)
    if arr.shape != (size, size, 3):
        raise ValueError(f"preprocessing produced shape {arr.shape}, expected ({size}, {size}, 3)")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(..., 3, S, S) uint8 -> float32 normalised with the spec's mean/std (what the graphs do)."""
    mean = np.asarray(spec.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    return (pixels.astype(np.float32) / 255.0 - mean) / std
