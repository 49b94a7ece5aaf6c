"""Safe image decoding shared by the HTTP service and batch scoring.

Untrusted bytes -> uint8 CHW pixels, already resized (short side) and center-cropped to the
bundle's square input size. Normalisation happens later (inside the image graph, or in the
eager runtime), so what crosses process boundaries is compact uint8.

Order of checks (cheapest first, nothing decoded before the header is trusted):
1. byte cap;
2. format chosen from magic bytes (JPEG, PNG, WEBP only) -- the client's content type is ignored;
3. width x height read from the header and checked against the pixel cap and an aspect-ratio cap
   (a 1 x 40M strip would explode when resized). Pillow's own decompression-bomb guard (an error
   above ~179 MP, a warning above ~89 MP, an error too under `-W error`) fires inside
   `Image.open`, before our checks: then the header is read again by the format's own parser
   (`Image.open` minus that guard, for this image only; `PIL.Image.MAX_IMAGE_PIXELS` is left as
   it is) and our pixel cap decides, so such an image is `image_too_large` with its real size;
4. decode, then the one preprocessing path every part of clipheads uses
   (`clipheads.training.preprocess.pixels_from_image`: JPEG draft mode when shrinking a lot, EXIF
   orientation, RGB conversion, resize + center crop). Our pixel cap is below Pillow's
   bomb-warning threshold by default.
Every failure is an `ImageRejected(kind, detail, http_status)`; nothing else escapes `decode_image`.
"""
from __future__ import annotations

import io
import math
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from clipheads.training.preprocess import jpeg_draft_size, pixels_from_image

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # per image; the HTTP body cap is separate
DEFAULT_MAX_PIXELS = 40_000_000  # ~40 MP, checked from the header before decoding
DEFAULT_MAX_ASPECT = 30.0  # long side / short side

class ImageRejected(ValueError):
    """An input image we refuse. `kind` is a stable machine-readable code used in HTTP error
    bodies and metrics; `http_status` is what the service answers with."""

    def __init__(self, kind: str, detail: str, http_status: int = 422):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.http_status = http_status

    def __reduce__(self):  # crosses process boundaries (the large-image decode process)
        return ImageRejected, (self.kind, self.detail, self.http_status)


@dataclass(frozen=True)
class DecodeSpec:
    """What the model wants (from the bundle / head preprocess) plus the safety caps."""

    image_size: int
    interpolation: str = "bicubic"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT

    @classmethod
    def from_preprocess(cls, pre, **caps) -> "DecodeSpec":
        """`pre`: a training PreprocessSpec, or a bundle manifest's `preprocess` dict."""
        if isinstance(pre, dict):
            size = int(pre["image_size"])
            interp = str(pre.get("resize", "shortest:bicubic")).partition(":")[2] or "bicubic"
        else:
            size, interp = int(pre.image_size), pre.interpolation
        return cls(image_size=size, interpolation=interp, **{k: v for k, v in caps.items() if v is not None})


def sniff_format(data: bytes) -> Optional[str]:
    """The image format from magic bytes, or None if it is not one we accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before anything is decoded."""

    format: str
    width: int
    height: int
    decode_pixels: int  # pixels the decoder will hold in memory (a baseline JPEG: after draft scaling)
    progressive: bool = False  # a progressive JPEG: many scans over the whole image

    @property
    def pixels(self) -> int:
        """width x height: what the decoder reads through (libjpeg entropy-decodes every coefficient
        of a JPEG, drafted or not), the measure of its CPU time."""
        return self.width * self.height


def _draft_scale(w: int, h: int, want: tuple[int, int]) -> int:
    """The scale Pillow's JPEG `draft` picks for `want`: the largest of 8, 4, 2, 1 not above
    min(w // want_w, h // want_h) (PIL.JpegImagePlugin.JpegImageFile.draft)."""
    most = min(w // want[0], h // want[1])
    return next(a for a in (8, 4, 2, 1) if a <= max(most, 1))


def _decoded_pixels(fmt: str, w: int, h: int, size: int, progressive: bool = False) -> int:
    """Pixels the decoder holds: a progressive JPEG keeps every DCT coefficient of the full image
    until its last scan, whatever the draft scale, so it counts at full size."""
    want = jpeg_draft_size(w, h, size) if fmt == "JPEG" and not progressive else None
    if want is None:
        return w * h
    s = _draft_scale(w, h, want)
    return math.ceil(w / s) * math.ceil(h / s)


def _open_unguarded(data: bytes, fmt: str) -> Image.Image:
    """What `Image.open(data, formats=[fmt])` returns, without its decompression-bomb check (which
    only looks at the header's size): the format's own header parser, for this one image."""
    factory, _accept = Image.OPEN[fmt]  # registered: Image.open just used this plugin
    return factory(io.BytesIO(data))


def _open_checked(data: bytes, spec: DecodeSpec) -> tuple[Image.Image, ImageHeader]:
    """Checks 1-3 of the module docstring; returns the opened (not decoded) image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageRejected("invalid_image", "image payload is not bytes", 422)
    n = len(data)
    if n == 0:
        raise ImageRejected("invalid_image", "empty image payload", 422)
    if n > spec.max_bytes:
        raise ImageRejected("too_many_bytes", f"image is {n} bytes; the limit is {spec.max_bytes}", 413)
    fmt = sniff_format(bytes(data[:16]))
    if fmt is None:
        raise ImageRejected(
            "unsupported_format", "not a JPEG, PNG or WEBP file (format is detected from the bytes)", 415
        )
    try:
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            im = _open_unguarded(data, fmt)  # our cap, checked below, is the one that decides
        w, h = im.size  # header only; nothing is decoded yet
    except ImageRejected:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure is the input's fault
        raise ImageRejected("invalid_image", f"cannot read {fmt} header ({type(err).__name__})", 422) from None
    if w <= 0 or h <= 0:
        raise ImageRejected("invalid_image", f"bad image size {w}x{h}", 422)
    if w * h > spec.max_pixels:
        raise ImageRejected(
            "image_too_large", f"{w}x{h} = {w * h} pixels; the limit is {spec.max_pixels}", 422
        )
    if max(w, h) / min(w, h) > spec.max_aspect:
        raise ImageRejected("bad_aspect_ratio", f"{w}x{h}: aspect ratio above {spec.max_aspect:g}", 422)
    progressive = fmt == "JPEG" and bool(im.info.get("progressive"))
    return im, ImageHeader(fmt, w, h, _decoded_pixels(fmt, w, h, spec.image_size, progressive), progressive)


def probe_image(data: bytes, spec: DecodeSpec) -> ImageHeader:
    """The header checks alone (byte cap, format, pixel and aspect caps): cheap, decodes nothing.
    Raises only ImageRejected."""
    return _open_checked(data, spec)[1]


def decode_image(data: bytes, spec: DecodeSpec) -> np.ndarray:
    """Untrusted bytes -> (3, S, S) uint8 pixels. Raises only ImageRejected."""
    im, header = _open_checked(data, spec)
    try:
        pixels = pixels_from_image(im, spec.image_size, spec.interpolation)
    except ImageRejected:
        raise
    except Exception as err:  # noqa: BLE001 - truncated data, corrupt chunks, bombs, ...
        raise ImageRejected("invalid_image", f"cannot decode {header.format} image ({type(err).__name__})", 422) from None
    return pixels  # (3, S, S)


DecodeResult = Union[np.ndarray, ImageRejected]


def decode_or_reject(data: bytes, spec: DecodeSpec) -> DecodeResult:
    """decode_image that returns the rejection instead of raising it (for executors)."""
    try:
        return decode_image(data, spec)
    except ImageRejected as err:
        return ImageRejected(err.kind, err.detail, err.http_status)


class ImageDecoder:
    """Decodes many images in a thread pool (Pillow releases the GIL while decoding/resizing)."""

    def __init__(self, spec: DecodeSpec, workers: int = 2, executor: Optional[Executor] = None):
        self.spec = spec
        self._own = executor is None
        self._pool = executor or ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.spec)

    def _safe(self, data: bytes) -> DecodeResult:
        try:
            return decode_image(data, self.spec)
        except ImageRejected as err:
            return err

    def decode_many(self, blobs: Sequence[bytes]) -> list[DecodeResult]:
        """One entry per blob, in order: pixels or the ImageRejected for that blob."""
        if len(blobs) <= 1:
            return [self._safe(b) for b in blobs]
        return list(self._pool.map(self._safe, blobs))

    def decode_all(self, blobs: Sequence[bytes]) -> np.ndarray:
        """(N, 3, S, S) uint8, or raises the first rejection with the image index in its detail."""
        out = self.decode_many(blobs)
        for i, r in enumerate(out):
            if isinstance(r, ImageRejected):
                raise ImageRejected(r.kind, f"image {i}: {r.detail}", r.http_status)
        if not out:
            return np.zeros((0, 3, self.spec.image_size, self.spec.image_size), np.uint8)
        return np.stack(out)

    def close(self) -> None:
        if self._own:
            self._pool.shutdown(wait=False)


def iter_decode(blobs: Iterable[bytes], spec: DecodeSpec) -> Iterable[DecodeResult]:
    """Sequential generator form for streaming batch scoring."""
    for b in blobs:
        try:
            yield decode_image(b, spec)
        except ImageRejected as err:
            yield err
