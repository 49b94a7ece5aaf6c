"""Decode budgets without a server: header probes count the pixels a decode will produce, and
the lanes refuse over-budget requests before anything is decoded (the real-server tests are in
tests/test_serving_attacks.py)."""
from __future__ import annotations

import functools
import io
import os
import sys
import time

import pytest
from PIL import Image

from clipheads.serving.front.decode_budget import DecodeBudget, DecodeLanes
from clipheads.serving.images import DecodeSpec, ImageRejected, decode_image, probe_image

SPEC = DecodeSpec(image_size=32)


def _img(fmt: str, size: tuple[int, int], **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def webp_bomb() -> bytes:
    """38 bytes that declare 16383 x 2400 = 39.3 MP (under the 40 MP per-image cap)."""
    return _img("WEBP", (16383, 2400), lossless=True, quality=0, method=0)


def test_probe_counts_what_the_decoder_materialises(webp_bomb):
    h = probe_image(webp_bomb, SPEC)
    assert (h.format, h.width, h.height, h.decode_pixels) == ("WEBP", 16383, 2400, 16383 * 2400)
    assert len(webp_bomb) < 100
    big_jpeg = _img("JPEG", (4000, 3000))  # libjpeg's draft mode decodes it at 1/8 scale
    hj = probe_image(big_jpeg, SPEC)
    im = Image.open(io.BytesIO(big_jpeg))
    from clipheads.serving.images import jpeg_draft_size

    im.draft("RGB", jpeg_draft_size(4000, 3000, 32))
    im.load()
    assert hj.decode_pixels == im.width * im.height == 500 * 375
    with pytest.raises(ImageRejected) as err:  # the per-image cap is still the header's w x h
        probe_image(_img("PNG", (10000, 6000)), SPEC)
    assert err.value.kind == "image_too_large"


@pytest.mark.parametrize("w,h,size", [(3580, 3580, 224), (4000, 3000, 32), (1801, 1800, 224), (897, 1200, 224),
                                      (2000, 1000, 48)])
def test_probe_counts_the_draft_scale_pillow_picks(w, h, size):
    """Pillow's `draft` scale is the largest of 8/4/2/1 not above min(w // want_w, h // want_h); at
    3580 x 3580 for 224 px that is 4 (895 x 895 decoded), where rounding up would say 8."""
    from clipheads.serving.images import jpeg_draft_size

    data = _img("JPEG", (w, h))
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", jpeg_draft_size(w, h, size))
    im.load()
    assert probe_image(data, DecodeSpec(image_size=size)).decode_pixels == im.width * im.height


def test_a_progressive_jpeg_counts_at_full_size_and_never_decodes_inline():
    """libjpeg keeps every coefficient of a progressive JPEG until its last scan (full-size memory,
    whatever the draft); and a large baseline JPEG drafted down to a small image still costs a full
    entropy decode, so what decodes on the event loop is judged by width x height."""
    lanes = DecodeLanes()
    try:
        prog = _img("JPEG", (4096, 4096), progressive=True)
        hp = probe_image(prog, SPEC)
        assert hp.progressive and hp.decode_pixels == 4096 * 4096
        base = _img("JPEG", (4096, 4096))
        hb = probe_image(base, SPEC)
        assert not hb.progressive and hb.decode_pixels <= lanes.budget.inline_pixels  # drafted to 512 x 512
        assert not lanes.inline(hb, len(base))
        small = _img("JPEG", (320, 240))
        assert lanes.inline(probe_image(small, SPEC), len(small))
        small_prog = _img("JPEG", (320, 240), progressive=True)
        assert not lanes.inline(probe_image(small_prog, SPEC), len(small_prog))
        assert not lanes.inline(probe_image(small, SPEC), 2 << 20)  # a small image padded to 2 MiB
    finally:
        lanes.close()


def test_request_budget_refuses_before_decoding(webp_bomb):
    lanes = DecodeLanes(DecodeBudget(request_pixels=64_000_000, process_pixels=128_000_000))
    try:
        h = probe_image(webp_bomb, SPEC)
        with lanes.admit([h]):  # one 39 MP image: fine
            assert lanes.large_in_use == h.decode_pixels
        assert lanes.large_in_use == 0
        with pytest.raises(ImageRejected) as err:
            lanes.admit([h, h])  # 78.6 MP in one request
        assert (err.value.kind, err.value.http_status) == ("too_many_pixels", 413)
        assert lanes.large_in_use == 0
    finally:
        lanes.close()


def test_process_budget_is_shared_and_released(webp_bomb):
    h = probe_image(webp_bomb, SPEC)
    small = probe_image(_img("PNG", (64, 48)), SPEC)
    lanes = DecodeLanes(DecodeBudget(process_pixels=2 * h.decode_pixels))
    try:
        a, b = lanes.admit([h]), lanes.admit([h])
        with pytest.raises(ImageRejected) as err:
            lanes.admit([h])
        assert (err.value.kind, err.value.http_status) == ("decode_busy", 503)
        with lanes.admit([small]):  # small images never touch the large lane's budget
            assert lanes.executor_for(small) is lanes.small and lanes.executor_for(h) is lanes.large
        a.__exit__(None, None, None)
        lanes.admit([h]).__exit__(None, None, None)
        b.__exit__(None, None, None)
        assert lanes.large_in_use == 0
    finally:
        lanes.close()


def test_small_images_do_not_queue_behind_a_large_decode(webp_bomb):
    """While the large lane decodes a 39 MP image, a small image decodes in its own lane."""
    lanes = DecodeLanes(DecodeBudget())
    try:
        big = lanes.large.submit(decode_image, webp_bomb, SPEC)
        time.sleep(0.05)
        lanes.small.submit(decode_image, _img("PNG", (64, 48)), SPEC).result(timeout=30)
        assert not big.done()  # ~1 s of decoding vs ~1 ms: the small image did not wait for it
        assert big.result(timeout=60).shape == (3, 32, 32)
        if sys.platform.startswith("linux"):  # the large lane is another process, at lower CPU priority
            assert lanes.large.submit(os.getpid).result() != os.getpid()
            assert lanes.large.submit(functools.partial(os.getpriority, os.PRIO_PROCESS, 0)).result() >= 10
    finally:
        lanes.close()
