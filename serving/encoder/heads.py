"""The encoder's serving head and its atomic swap (RELIABILITY.md B5 #15).

A `LoadedHead` is a warmed-up Runtime plus its version (a content hash of the head file or the
bundle manifest, which itself holds the sha256 of every graph). `HeadSlot.current` is replaced by
one attribute assignment, and an encoder pass reads it once, so every image of a pass, and so every
request (a request is never split across passes), is computed by exactly one version, and the
response says which. A new head is loaded and warmed up beside the serving one; if that fails, or
its layout differs, the serving head stays.

What a swap may change is the weights: the heads' prompts/adapters/class matrices, even the method.
It must keep the layout the front plans requests with (tasks, their labels and encoder paths,
preprocessing, backbone identity, logit scale); a different layout is a new deployment (start a new
server, move traffic), and is refused with the list of differences.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..runtimes import Runtime, open_runtime, source_sha256

log = logging.getLogger("clipheads.serving")


class HeadLoadError(RuntimeError):
    """The new head could not be loaded or warmed up; the serving head is unchanged."""


class HeadIncompatible(RuntimeError):
    """The new head's layout differs from the serving one; the serving head is unchanged."""


def head_version(source: str | Path) -> str:
    """12 hex digits naming the content of a head file or bundle directory."""
    return source_sha256(source)[:12]


def layout(runtime: Runtime) -> dict[str, Any]:
    """What the front plans requests with; a swap must keep it."""
    return {
        "preprocess": dict(runtime.preprocess),
        "identity": runtime.identity,
        "base_path": int(runtime.base_path),
        "logit_scale": round(float(runtime.logit_scale), 4),
        "has_text": bool(runtime.has_text),
        "paths": len(runtime.paths),
        "tasks": {t.name: {"labels": list(t.classnames), "path": t.path, "slice": list(t.logit_slice)}
                  for t in runtime.tasks.values()},
    }


def layout_differences(old: dict, new: dict) -> list[str]:
    diffs = [k for k in old if k != "tasks" and old[k] != new.get(k)]
    ot, nt = old["tasks"], new["tasks"]
    if set(ot) != set(nt):
        diffs.append(f"tasks {sorted(ot)} -> {sorted(nt)}")
    else:
        diffs += [f"task {n!r} ({', '.join(k for k in ot[n] if ot[n][k] != nt[n][k])})" for n in ot if ot[n] != nt[n]]
    return diffs


@dataclass(frozen=True)
class LoadedHead:
    runtime: Runtime
    version: str
    source: str


def load_head(source: str | Path, kind: str = "auto",
              wrap: Optional[Callable[[Runtime], Runtime]] = None, warm: bool = True,
              weights: Optional[str] = None) -> LoadedHead:
    """Open (and unless `warm=False` warm up) a head; HeadLoadError with the reason if that fails.
    `wrap` (runtime -> runtime) is the fault-injection hook of the serving tests."""
    try:
        version = head_version(source)
        runtime = open_runtime(str(source), kind, weights=weights)
        if wrap is not None:
            runtime = wrap(runtime)
        if warm:
            runtime.warmup()
    except Exception as err:  # noqa: BLE001 - any failure means: do not serve this head
        raise HeadLoadError(f"{type(err).__name__}: {err}") from err
    return LoadedHead(runtime, version, str(source))


class HeadSlot:
    """The serving head. Readers take `current` once per unit of work; `swap` replaces it."""

    def __init__(self, head: LoadedHead, weights: Optional[str] = None):
        self.current = head
        self._weights = weights  # backbone weights override, reused by every swap (same backbone)
        self._layout = layout(head.runtime)
        self._swap_lock = threading.Lock()  # one load at a time

    def swap(self, source: str | Path, kind: str = "auto",
             wrap: Optional[Callable[[Runtime], Runtime]] = None) -> tuple[LoadedHead, LoadedHead]:
        """Load, warm up and check `source`, then make it current. Returns (old, new)."""
        with self._swap_lock:
            new = load_head(source, kind, wrap, weights=self._weights)
            diffs = layout_differences(self._layout, layout(new.runtime))
            if diffs:
                raise HeadIncompatible("the new head changes " + "; ".join(diffs)
                                       + " (a swap may change weights, not the layout: deploy a new server for that)")
            old, self.current = self.current, new
            log.info("head swapped: %s (%s) -> %s (%s)", old.version, old.source, new.version, new.source)
            return old, new

