"""Public functions that are not simply re-exported from a part (see `clipheads.__init__`).

Each is a thin layer over the function the CLI calls, so a notebook and `clipheads CMD` run the
same code: `export_bundle` is `clipheads export`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from clipheads.training.methods.base import HeadMethod

PathLike = Union[str, os.PathLike]


def export_bundle(heads: Union[PathLike, HeadMethod, Sequence[Union[PathLike, HeadMethod]]],
                  out: Optional[PathLike], *, target: str = "onnx", precision: str = "fp32",
                  rename: Optional[dict] = None, backbone_weights: Optional[str] = None,
                  allow_parity_failure: bool = False, verbose: bool = False, **options):
    """Fold heads (files or HeadMethods on one backbone) into a parity-gated bundle directory.

    Returns an `ExportResult` (`.passed`, `.bundle`, `.manifest`, `.parity`); with a failed gate
    nothing is written unless `allow_parity_failure`. `rename={"old": "new"}` renames tasks
    (`"2:old"` picks the second head's). Other keywords are `ExportOptions` fields (`max_batch`,
    `input_dtype`, `fused_attention`, `probes`, ...).

    Example:
        >>> result = clipheads.export_bundle(head, "bundle/")  # doctest: +SKIP
        >>> result.passed, result.manifest["parity"]["worst"]["min_top1_agreement"]  # doctest: +SKIP
        (True, 1.0)
    """
    from clipheads.export import heads as export_heads
    from clipheads.export.pipeline import ExportOptions

    refs = [heads] if isinstance(heads, (str, os.PathLike, HeadMethod)) else list(heads)
    opts = ExportOptions(target=target, precision=precision, **options)
    log = (lambda msg: print(f"[export] {msg}")) if verbose else (lambda msg: None)
    return export_heads.export_bundle(refs, out, opts, backbone_weights=backbone_weights, rename=rename,
                                      allow_parity_failure=allow_parity_failure, log=log)
