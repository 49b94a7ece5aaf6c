"""A CPU image pass run as two half-batch passes at once, each on one thread (ONNX Runtime).

On a 2-core machine ORT runs a pass on two intra-op threads: every op is split between them and
joined, several hundred times per ViT pass, and with the service's non-spinning pool
(`CLIPHEADS_ORT_SPIN=0`, because spinning took CPU the front needs) the second thread sleeps and is
woken for each op. Two half batches on one thread each, started together, have no pool at all.
Measured on the 2-core AMD EPYC host (`bench/serving/results/split-passes.md`, sustained, the runtime
alone): ViT-B/32 fp32 1.02-1.07x at batches 2-64, int8 1.10-1.19x at batches 2-8 and 0.95-1.04x at
16-64. Served (`overhead-30-split-passes.md`, 3 rounds) the front shares those cores, a half pass
whose thread is descheduled holds up the other, and img/s moved within the rounds' spread (fp32 c=8
-2%, int8 c=32 +4%) while server CPU per request fell 3-8%. So it is opt-in
(`CLIPHEADS_ORT_SPLIT=1`); the price is a second session per image graph (about the graph's size
again in memory). A batch of one cannot split and keeps the 2-thread pass.

Its sibling, `CLIPHEADS_ORT_PASSES=2`, gets the same 1-thread passes without the join: the encoder's
two runners each take half of a backlog and run their passes independently on the same 1-thread
sessions (encoder/batching.py; `overhead-31-two-passes.md`: ViT-B/32 fp32 c=8 +10% img/s, 92-94% of
raw in 3 of 3 rounds, int8 c=8/32 +6-7%, p99 +40-60%, +370 MB resident for fp32 ViT-B/32).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import numpy as np

MIN_BATCH = 2  # a batch this size or larger runs as two halves


def two_single_threads_fit(intra_op_threads: int | None, cores: int) -> bool:
    """Two 1-thread passes replace one pass exactly where the image graphs would run on two intra-op
    threads (ORT's default on two cores, or CLIPHEADS_ORT_THREADS=2), the case both opt-ins were
    measured on. One thread (small graphs) has nothing to share; on more cores two 1-thread passes
    would leave the rest idle."""
    return (intra_op_threads or cores) == 2


def split_wanted(setting: str, intra_op_threads: int | None, cores: int) -> bool:
    """`CLIPHEADS_ORT_SPLIT=1` (default "0": off), where two 1-thread passes fit."""
    return setting == "1" and two_single_threads_fit(intra_op_threads, cores)


def passes_wanted(setting: str, intra_op_threads: int | None, cores: int) -> int:
    """`CLIPHEADS_ORT_PASSES=2` (default "1"): passes the encoder may run at once, 2 where two
    1-thread passes fit, else 1."""
    return 2 if setting == "2" and two_single_threads_fit(intra_op_threads, cores) else 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SplitPass:
    """Runs `sessions[fname]` (1 intra-op thread each; ORT sessions take concurrent `run` calls)
    on both halves of a feed at once: the second half on a helper thread, the first on the caller."""

    def __init__(self, sessions: dict[str, object]):
        self.sessions = sessions
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="ort-half-pass")

    def run(self, fname: str, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.sessions[fname]
        n = len(feed["pixels"])
        h = n // 2
        # slices along the batch axis of C-contiguous arrays stay contiguous: no copies in
        second = self._helper.submit(sess.run, outputs, {k: v[h:] for k, v in feed.items()})
        try:
            first = sess.run(outputs, {k: v[:h] for k, v in feed.items()})
        finally:
            rest = second.result()  # waited for even when the first half failed: no run left behind
        return [np.concatenate([a, b]) for a, b in zip(first, rest)]
