"""torch.onnx.export with the choices that matter made explicitly (ECOSYSTEM.md 3.1).

* exporter: the TorchScript exporter (`dynamo=False`) by default: TensorRT 10.3 (JetPack 6)
  parses its opset-17 graphs and ORT's transformer fusions were written against its patterns.
  `dynamo=True` is available for comparison.
* `torch.backends.mha.set_fastpath_enabled(False)` while exporting: open_clip 3.x blocks use
  nn.MultiheadAttention, whose eval fast path (`_native_multi_head_attention`) has no ONNX symbolic.
* the batch axis is always dynamic, and the example batch is >= 2 so no size-1 dimension is baked.
* every written graph passes `onnx.checker.check_model` (full check, with shape inference).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from clipheads.training.text_length import LENGTH_BUCKET

from .attention import traceable_text_attention
from .fold import FoldedImageEncoder, TextEncoder

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 9: "bool", 16: "bfloat16"}


class ExportError(RuntimeError):
    """torch.onnx.export failed or produced an invalid graph."""


@contextlib.contextmanager
def mha_fastpath_disabled():
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


@contextlib.contextmanager
def exporter_logs_quiet(names: Sequence[str] = ("onnxscript", "torch.onnx")):
    """The dynamo exporter's logged chatter (constant-folding skips, its opset fallback with a
    traceback) at ERROR only: the opset a graph ends up declaring is reported by the pipeline in
    one line and recorded in the manifest (`opset`, `opset_requested`)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_module(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
    extra_axes: Optional[Mapping[str, Mapping[int, str]]] = None,
    output_dims: Optional[Mapping[str, Sequence]] = None,
) -> Path:
    """Export with a dynamic axis 0 ("batch") on every input and output, plus `extra_axes`
    ({input name: {axis: name}}, e.g. the text graph's sequence axis); pin `output_dims`
    (`set_static_dims`); check the graph once; return its path."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if any(a.shape[0] < 2 for a in args):
        raise ExportError("export with an example batch >= 2 (a batch of 1 can get baked into reshapes)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    kw: dict = dict(input_names=list(input_names), output_names=list(output_names), opset_version=opset)
    extra_axes = {k: dict(v) for k, v in (extra_axes or {}).items()}
    for name, axes in extra_axes.items():
        arg = args[list(input_names).index(name)]
        if any(arg.shape[a] < 2 for a in axes):
            raise ExportError(f"export {name} with an example size >= 2 on its dynamic axes {sorted(axes)}")
    if exporter == "torchscript":
        kw["dynamic_axes"] = {n: {0: "batch", **extra_axes.get(n, {})} for n in list(input_names) + list(output_names)}
        kw["dynamo"] = False
        kw["do_constant_folding"] = True
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dims = {ax: torch.export.Dim(nm, min=1, max=4096) for axes in extra_axes.values() for ax, nm in axes.items()}
        kw["dynamic_shapes"] = tuple({0: batch, **{a: dims[a] for a in extra_axes.get(n, {})}}
                                     for n, _ in zip(input_names, args))
        kw["dynamo"] = True
        kw["external_data"] = False
    try:
        with mha_fastpath_disabled(), torch.no_grad(), warnings.catch_warnings(), exporter_logs_quiet(), \
                contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter print()s progress; stdout is --json's
            warnings.simplefilter("ignore")  # TracerWarnings / legacy-exporter deprecation chatter
            torch.onnx.export(module, args, str(path), **kw)
    except Exception as err:  # noqa: BLE001 - report any exporter failure as one clear error
        raise ExportError(f"torch.onnx.export ({exporter}, opset {opset}) failed: {type(err).__name__}: {err}") from err
    if output_dims:
        set_static_dims(path, output_dims)
    check_graph(path)
    return path


def set_static_dims(path: str | Path, dims: dict[str, Sequence]) -> None:
    """Pin the non-batch dims of named outputs (the exporter leaves names like 'Addlogits_dim_1')."""
    import onnx

    m = onnx.load(str(path))
    for out in m.graph.output:
        if out.name in dims:
            for d, v in zip(out.type.tensor_type.shape.dim, dims[out.name]):
                if v is not None:
                    d.ClearField("dim_param")
                    d.dim_value = int(v)
    onnx.save(m, str(path))


def check_graph(path: str | Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"{path}: onnx.checker rejected the graph: {err}") from err


def graph_io(path: str | Path) -> dict:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]} with symbolic dims as strings."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def desc(vi) -> dict:
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
        return {"name": vi.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "inputs": [desc(v) for v in m.graph.input if v.name not in inits],
        "outputs": [desc(v) for v in m.graph.output],
        "opset": opset,  # what the file declares (the dynamo exporter may not reach the requested one)
        "domains": sorted(o.domain for o in m.opset_import if o.domain not in ("", "ai.onnx")),
    }


def example_pixels(encoder: FoldedImageEncoder, batch: int = 2) -> tuple[Tensor, Tensor]:
    s = int(encoder.backbone.preprocess.image_size)
    if encoder.pixels.input_dtype == "uint8":
        px = torch.randint(0, 256, (batch, 3, s, s), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    else:
        px = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    ti = torch.arange(batch, dtype=torch.int64) % max(1, encoder.bank_size)
    return px, ti


def export_image_graph(encoder: FoldedImageEncoder, path: str | Path, opset: int = DEFAULT_OPSET,
                       exporter: str = "torchscript") -> Path:
    """pixels (N,3,S,S), task_index (N,) -> logits (N, K), features (N, E)."""
    k, e = encoder.class_matrix.shape
    return export_module(encoder, example_pixels(encoder), path, ["pixels", "task_index"], ["logits", "features"],
                         opset, exporter, output_dims={"logits": (None, k), "features": (None, e)})


def export_text_graph(text: TextEncoder, path: str | Path, opset: int = DEFAULT_OPSET,
                      exporter: str = "torchscript", variable_length: Optional[bool] = None) -> Path:
    """tokens (N, L) int64 -> features (N, E) normalised. L is a dynamic axis ("sequence", any
    length up to the context) when the tower can be trimmed (`text.variable_length`), else the
    full context. `variable_length=False` forces the full context (what bundles before the
    variable-length text graph hold)."""
    bb = text.backbone
    tokens = bb.tokenize(["a photo of a thing.", "a sketch of two small things."]).cpu()
    axes = None
    if text.variable_length if variable_length is None else variable_length:
        # an example length that is neither 1 nor the context, so neither gets baked in
        tokens = tokens[:, :min(LENGTH_BUCKET + 5, bb.context_length - 1)]
        axes = {"tokens": {1: "sequence"}}
    with traceable_text_attention(bb) if axes else contextlib.nullcontext():
        return export_module(text, (tokens,), path, ["tokens"], ["features"], opset, exporter, axes,
                             output_dims={"features": (None, bb.embed_dim)})
