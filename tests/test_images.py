"""clipheads.serving.images without a server: allow-list by magic bytes, caps before decoding, geometry."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from clipheads.serving.images import DecodeSpec, ImageDecoder, ImageRejected, decode_image, sniff_format

SPEC = DecodeSpec(image_size=32)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def reject(data: bytes, spec: DecodeSpec = SPEC) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, spec)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_uint8_chw(fmt):
    im = Image.new("RGB", (80, 40), (200, 30, 30))
    out = decode_image(encode(im, fmt), SPEC)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert abs(int(out[0].mean()) - 200) < 8 and int(out[1].mean()) < 50


def test_resize_short_side_then_center_crop():
    im = Image.new("RGB", (96, 32), (0, 0, 0))
    im.paste((255, 255, 255), (32, 0, 64, 32))  # white middle third
    out = decode_image(encode(im, "PNG"), SPEC)
    assert out.min() > 200  # the crop is exactly the white centre


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (64, 32), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 32, 32))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed -> becomes 32x64 portrait
    out = decode_image(encode(im, "JPEG", exif=exif, quality=95), DecodeSpec(image_size=16))
    # after transposition the white half is the top half
    assert out[:, :4].mean() > 180 and out[:, -4:].mean() < 60


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_modes_convert_to_rgb(mode):
    im = Image.new(mode, (40, 40))
    out = decode_image(encode(im, "PNG"), SPEC)
    assert out.shape == (3, 32, 32)


def test_big_jpeg_uses_draft_and_is_fast():
    im = Image.new("RGB", (4000, 3000), (10, 120, 240))
    data = encode(im, "JPEG", quality=80)
    t = time.perf_counter()
    out = decode_image(data, DecodeSpec(image_size=64))
    assert time.perf_counter() - t < 1.0
    assert out.shape == (3, 64, 64) and abs(int(out[2].mean()) - 240) < 10


def test_magic_bytes_not_content_type():
    for data in (b"%PDF-1.4 hello", b"GIF89a" + b"\0" * 20, b"II*\0" + b"\0" * 20, b"\0" * 10, b"P6\n1 1\n255\n\0\0\0"):
        assert sniff_format(data) is None
        e = reject(data)
        assert e.kind == "unsupported_format" and e.http_status == 415
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    assert reject(tiff).http_status == 415


def test_pixel_cap_checked_from_header_before_decoding():
    data = encode(Image.new("L", (10000, 6000)), "PNG")  # 60 MP in ~60 KB
    t = time.perf_counter()
    e = reject(data)
    assert time.perf_counter() - t < 0.1
    assert e.kind == "image_too_large" and e.http_status == 422


def test_byte_cap_and_empty():
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert reject(data, DecodeSpec(image_size=32, max_bytes=10)).http_status == 413
    assert reject(b"").kind == "invalid_image"


def test_extreme_aspect_ratio_refused():
    e = reject(encode(Image.new("L", (3000, 10)), "PNG"))
    assert e.kind == "bad_aspect_ratio"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_and_corrupt_give_422(fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    for bad in (data[: len(data) // 2], data[:20], data[:12] + bytes(rng.integers(0, 255, 400, dtype=np.uint8))):
        e = reject(bad)
        assert e.http_status == 422 and e.kind == "invalid_image"


def test_random_garbage_never_raises_anything_else():
    rng = np.random.default_rng(1)
    seeds = [encode(Image.new("RGB", (20, 20), (1, 2, 3)), f) for f in ("PNG", "JPEG", "WEBP")]
    for i in range(300):
        base = bytearray(seeds[i % 3])
        for _ in range(rng.integers(1, 8)):
            base[rng.integers(0, len(base))] = rng.integers(0, 256)
        try:
            out = decode_image(bytes(base), SPEC)
            assert out.shape == (3, 32, 32)
        except ImageRejected:
            pass


_SEEDS = [encode(Image.new("RGB", (24, 17), (9, 80, 200)), f) for f in ("PNG", "JPEG", "WEBP")]


def _mutated():
    """Hypothesis inputs for B5 #4: real PNG/JPEG/WEBP files with bytes overwritten, cut, or
    inserted (so headers parse and decoders go deep), plus raw binary."""
    from hypothesis import strategies as st

    edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
                     min_size=1, max_size=6)

    def apply(seed_and_edits):
        k, ops = seed_and_edits
        data = bytearray(_SEEDS[k])
        for kind, pos, blob in ops:
            pos %= len(data) + 1
            if kind == 0:
                data[pos:pos + len(blob)] = blob  # overwrite
            elif kind == 1:
                del data[pos:]  # truncate
            else:
                data[pos:pos] = blob  # insert
            if not data:
                data = bytearray(blob)
        return bytes(data)

    return st.one_of(st.tuples(st.integers(0, 2), edits).map(apply), st.binary(max_size=2048))


def test_hypothesis_decoder_only_ever_rejects_cleanly():
    """B5 #4 fast version (1,000 cases): any input either decodes to (3, S, S) uint8 or raises
    ImageRejected (a 4xx); nothing else escapes."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=1000, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutated())
    def check(data):
        try:
            out = decode_image(data, SPEC)
        except ImageRejected as err:
            assert 400 <= err.http_status < 500
        else:
            assert out.shape == (3, 32, 32) and out.dtype == np.uint8

    check()


def test_decoder_parallel_keeps_order_and_per_item_errors():
    good = [encode(Image.new("RGB", (40, 40), (i * 20, 0, 0)), "PNG") for i in range(6)]
    dec = ImageDecoder(SPEC, workers=2)
    try:
        out = dec.decode_many(good[:3] + [b"nope"] + good[3:])
        assert isinstance(out[3], ImageRejected)
        assert [int(o[0].mean()) // 20 for i, o in enumerate(out) if i != 3] == [0, 1, 2, 3, 4, 5]
        with pytest.raises(ImageRejected, match="image 3"):
            dec.decode_all(good[:3] + [b"nope"])
        assert dec.decode_all(good).shape == (6, 3, 32, 32)
    finally:
        dec.close()
