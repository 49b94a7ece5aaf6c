"""Variable text length: run the text tower on the tokens a call uses, not the whole context.

CLIP's text tower is causal and pools one position (the EOT token: `argmax` of the ids, or the
first `eos` id). Positions after the last pooled one can influence nothing that is pooled, so
cutting every row of a call to `max(pooled position) + 1` tokens gives the same features (up to
float rounding of the shorter matmuls) for a fraction of the compute: real labels are ~10-20
tokens of a 77-token context. Lengths are rounded up to a multiple of `LENGTH_BUCKET` so a
runtime sees a handful of shapes (TensorRT profiles, CUDA graphs, allocator caches).

Trimming is only valid for causal towers pooling `argmax`, `eos` or `first`; `text_length`
returns None for anything else (e.g. `last` pooling or a bidirectional tower), and callers then
keep the full context. Works on torch tensors and numpy arrays alike (serving tokenizes to numpy).

In PyTorch, `Backbone.encode_text` trims inside `trimmed_text()` (a context, so methods' own
`text_features` calls are trimmed at export and serving time without new arguments) and never
when the caller asks for per-token outputs (`return_tokens`, COMMA's distillation compares them
position by position). Training does not trim: it keeps the papers' computation exactly.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

LENGTH_BUCKET = 8
TRIMMABLE_POOLS = ("argmax", "eos", "first")

_TRIM = contextvars.ContextVar("clipheads_trim_text", default=False)


def bucketed(length: int, context_length: int, bucket: int = LENGTH_BUCKET) -> int:
    """`length` rounded up to a multiple of `bucket`, at least one bucket, at most the context."""
    return max(1, min(int(context_length), -(-max(1, int(length)) // bucket) * bucket))


def pooled_positions(tokens, pool_type: str = "argmax", eos_id: Optional[int] = None):
    """The position each row pools (what open_clip's text_global_pool reads), as an integer array."""
    if pool_type == "argmax":
        return tokens.argmax(-1)
    if pool_type == "eos":
        if eos_id is None:
            raise ValueError("eos pooling needs the tokenizer's eos id")
        return ((tokens == eos_id) * 1).argmax(-1)  # first eos (ints: torch has no bool argmax)
    if pool_type == "first":
        return tokens[..., 0] * 0
    raise ValueError(f"pool type {pool_type!r} cannot be trimmed")


def text_length(tokens, pool_type: str = "argmax", eos_id: Optional[int] = None, causal: bool = True,
                bucket: int = LENGTH_BUCKET) -> Optional[int]:
    """The bucketed length that keeps every pooled position of `tokens` (N, L), or None when
    this tower cannot be trimmed (not causal, or a pooling that reads other positions)."""
    if not causal or pool_type not in TRIMMABLE_POOLS or tokens.ndim != 2 or tokens.shape[0] == 0:
        return None
    last = int(pooled_positions(tokens, pool_type, eos_id).max())
    return bucketed(last + 1, tokens.shape[1], bucket)


def trim_tokens(tokens, pool_type: str = "argmax", eos_id: Optional[int] = None, causal: bool = True,
                bucket: int = LENGTH_BUCKET):
    """`tokens` (N, L) cut to `text_length` (unchanged when the tower cannot be trimmed)."""
    length = text_length(tokens, pool_type, eos_id, causal, bucket)
    return tokens if length is None or length >= tokens.shape[1] else tokens[:, :length]


@contextlib.contextmanager
def trimmed_text(enabled: bool = True) -> Iterator[None]:
    """Inside: `Backbone.encode_text` runs on the bucketed used length (see the module doc)."""
    token = _TRIM.set(bool(enabled))
    try:
        yield
    finally:
        _TRIM.reset(token)


def trimming() -> bool:
    return _TRIM.get()
