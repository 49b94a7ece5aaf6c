"""Decode budgets: how many pixels one request, and the whole front process, may decode.

Bytes are no measure of decode work: a 38-byte lossless WebP can declare 16383 x 2400 (39.3 MP,
under the per-image cap), which takes ~0.8 s and ~160 MB to decode, and 32 of them fit in a
1.8 KB JSON body. So decode work is counted in *decode pixels* read from the headers
(`images.probe_image`: width x height, or what libjpeg's draft mode will produce for a large
baseline JPEG; a progressive one holds its coefficients at full size), before anything is decoded:

- per request: the images' decode pixels together at most `request_pixels` (default 64 MP), else
  413 `too_many_pixels`;
- per process: a *large* image (more than `large_pixels`, default 4 MP, decoded) is decoded in
  its own lane -- a separate process at lower CPU priority (nice 10): Pillow holds the GIL for up to
  ~100 ms at a time while it decodes a big WebP, which stalled every request of the front when
  that lane was a thread -- and the decode pixels waiting or decoding in
  that lane are capped at `process_pixels` (default 128 MP): a request that would go over gets 503
  `decode_busy` with Retry-After at once, instead of queueing behind other large decodes.
  Small images have their own lane, so a normal request never waits behind a large decode.
- the smallest images (at most `inline_pixels` of width x height, default 256 Kpx: a 512 x 512
  image, ~0.5 ms, and at most `INLINE_BYTES`) decode right on the event loop: handing them to a
  thread cost more CPU than decoding them (tiny bundle, 1-image requests: 0.9-1.2 ms less server
  CPU per request at c=8/32, bench/serving/results/overhead-2-inline-decode.md). Their time on the
  loop is bounded by the header check done before: by width x height, not decode pixels, because
  libjpeg entropy-decodes a whole JPEG whatever its draft scale (a 4096 x 4096 JPEG drafted to
  512 x 512 took 19-38 ms), and never a progressive JPEG (one scan per pass over the image).

This module only schedules: what decoding does to the pixels is `images.decode_image` (or
whatever function the caller passes in).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Sequence

from ..images import DecodeResult, DecodeSpec, ImageHeader, ImageRejected, decode_or_reject, probe_image

DEFAULT_REQUEST_PIXELS = 64_000_000
DEFAULT_PROCESS_PIXELS = 128_000_000
DEFAULT_LARGE_PIXELS = 4_000_000
DEFAULT_INLINE_PIXELS = 262_144
INLINE_BYTES = 1 << 20  # and at most this many bytes (padding and markers are read too)
LARGE_LANE_NICE = 10  # niceness of the large-image thread (Linux: per thread)


@dataclass(frozen=True)
class DecodeBudget:
    request_pixels: int = DEFAULT_REQUEST_PIXELS
    process_pixels: int = DEFAULT_PROCESS_PIXELS
    large_pixels: int = DEFAULT_LARGE_PIXELS
    inline_pixels: int = DEFAULT_INLINE_PIXELS  # at most this width x height: on the caller's thread


def _lower_priority() -> None:
    """Worker initializer: the large-image decoder yields the CPU to the front under load, and
    dies on SIGTERM/SIGINT instead of running the front's (inherited) drain handlers."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICE)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: same priority, the budget still bounds the work


class Reservation:
    """The large-lane pixels one request holds while its images decode (a context manager)."""

    def __init__(self, lanes: "DecodeLanes", pixels: int):
        self._lanes, self.pixels = lanes, pixels

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self._lanes._release(self.pixels)
        self.pixels = 0


class DecodeLanes:
    """Admission and the two executors (small images, large images) of one process."""

    def __init__(self, budget: DecodeBudget = DecodeBudget(), small_threads: int = 2, large_workers: int = 1):
        self.budget = budget
        self.small = ThreadPoolExecutor(max_workers=max(1, small_threads), thread_name_prefix="decode")
        self._large_workers = max(1, large_workers)
        self.large = self._start_large()
        self._lock = threading.Lock()
        self.large_in_use = 0  # decode pixels admitted to the large lane and not yet released

    def probe(self, blobs: Sequence[bytes], spec: DecodeSpec) -> list[ImageHeader]:
        """Every image's header (images.probe_image), stopping at the first one that takes the
        request over its pixel budget: a body of 32 bombs costs two header reads, not 32."""
        headers, total = [], 0
        for i, b in enumerate(blobs):
            try:
                h = probe_image(b, spec)
            except ImageRejected as r:
                raise ImageRejected(r.kind, f"image {i}: {r.detail}", r.http_status) from None
            total += h.decode_pixels
            if total > self.budget.request_pixels:
                raise ImageRejected(
                    "too_many_pixels", f"the images of this request decode to more than "
                    f"{self.budget.request_pixels} pixels together (the limit per request)", 413)
            headers.append(h)
        return headers

    def is_large(self, header: ImageHeader) -> bool:
        return header.decode_pixels > self.budget.large_pixels

    def admit(self, headers: Sequence[ImageHeader]) -> Reservation:
        """Check one request's images against both budgets; ImageRejected (413 / 503) if over."""
        total = sum(h.decode_pixels for h in headers)
        if total > self.budget.request_pixels:
            raise ImageRejected(
                "too_many_pixels",
                f"the images of this request decode to {total} pixels together; the limit is "
                f"{self.budget.request_pixels} per request", 413)
        large = sum(h.decode_pixels for h in headers if self.is_large(h))
        if large:
            with self._lock:
                if self.large_in_use + large > self.budget.process_pixels:
                    raise ImageRejected("decode_busy", "the server is decoding other large images; retry shortly", 503)
                self.large_in_use += large
        return Reservation(self, large)

    def _release(self, pixels: int) -> None:
        if pixels:
            with self._lock:
                self.large_in_use -= pixels

    def _start_large(self) -> ProcessPoolExecutor:
        # fork: the child only runs images.decode_or_reject (Pillow, numpy); started now, before
        # the front's request threads exist, not lazily at the first large image
        pool = ProcessPoolExecutor(max_workers=self._large_workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_lower_priority)
        pool.submit(os.getpid).result()
        return pool

    def inline(self, header: ImageHeader, nbytes: int) -> bool:
        """Decoded on the caller's thread (the event loop): small in every measure of decode work."""
        return header.pixels <= self.budget.inline_pixels and nbytes <= INLINE_BYTES and not header.progressive

    def executor_for(self, header: ImageHeader) -> Executor:
        return self.large if self.is_large(header) else self.small

    async def decode(self, data: bytes, header: ImageHeader, spec: DecodeSpec, fn=decode_or_reject) -> DecodeResult:
        """`fn(data, spec)` in the image's lane. A decoder process that dies (a crashing or
        memory-exhausting image) is replaced, and that image is rejected."""
        if self.inline(header, len(data)):  # cheaper than the hand-off to a thread
            return fn(data, spec)
        loop = asyncio.get_running_loop()
        pool = self.executor_for(header)
        try:
            return await loop.run_in_executor(pool, fn, data, spec)
        except BrokenProcessPool:
            with self._lock:
                if self.large is pool:
                    self.large = self._start_large()
            return ImageRejected("invalid_image", "the image crashed the decoder", 422)

    def close(self) -> None:
        self.small.shutdown(wait=False, cancel_futures=True)
        self.large.shutdown(wait=False, cancel_futures=True)
