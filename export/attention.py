"""Optional: export the vision tower's self-attention as ONNX Runtime's fused attention op.

open_clip graphs fuse 0 attention nodes under onnxruntime.transformers' optimizer (its CLIP
pattern was written for Hugging Face's text encoder). Instead of matching a pattern after the
fact, `fused_attention(backbone)` swaps each vision block's `nn.MultiheadAttention` for a module
whose core exports as one `com.microsoft.MultiHeadAttention` node (q, k, v (N, L, D) unpacked;
scale 1/sqrt(head_dim), as nn.MultiheadAttention). In PyTorch it computes the same thing with
`scaled_dot_product_attention`, so tracing and eager checks still run.

Such graphs run on ONNX Runtime only (CPU and CUDA providers implement the op); never use them
for TensorRT. Blocks called with an attention mask (the causal text tower) keep their module.

`traceable_text_attention(backbone)` swaps the text blocks' attention for the same computation in
plain ops whose reshapes never name the sequence length: the TorchScript tracer bakes the
example's length into nn.MultiheadAttention's reshapes, which a variable-length text graph
cannot have. Plain opset ops, so it suits every target.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipheads.training.backbone import Backbone


class _MultiHeadAttentionOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:  # (N, L, D) each
        n, length, d = q.shape
        hd = d // num_heads
        split = lambda t: t.reshape(n, t.shape[1], num_heads, hd).transpose(1, 2)  # noqa: E731 (N, H, L, hd)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (N, H, L, hd)
        return o.transpose(1, 2).reshape(n, length, d)

    @staticmethod
    def symbolic(g, q, k, v, num_heads):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=int(num_heads))
        out.setType(q.type())
        return out


class FusedSelfAttention(nn.Module):
    """Drop-in for an open_clip block's nn.MultiheadAttention (self-attention without mask)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("fused attention needs a packed in_proj (q, k, v of one width)")
        self.original = mha
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False, attn_mask=None):
        if attn_mask is not None or key is not query or value is not query:
            return self.original(query, key, value, need_weights=need_weights, attn_mask=attn_mask)
        m = self.original
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, D)
        # three projections instead of one packed one + chunk: the export then has no Slice copies
        # of the packed output (6% of the int8 graph's time on ViT-B/32), and each is int8-quantizable
        w, b = m.in_proj_weight.chunk(3), (m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3)
        q, k, v = (F.linear(x, wi, bi) for wi, bi in zip(w, b))
        o = _MultiHeadAttentionOp.apply(q, k, v, self.num_heads)  # (N, L, D)
        o = m.out_proj(o)
        return (o if self.batch_first else o.transpose(0, 1)), None


@contextlib.contextmanager
def fused_attention(backbone: Backbone):
    """Temporarily swap the vision blocks' attention (restored on exit, even on error)."""
    blocks = backbone.model.visual.transformer.resblocks if backbone.vision_is_vit else []
    swapped = []
    try:
        for b in blocks:
            if isinstance(getattr(b, "attn", None), nn.MultiheadAttention):
                orig = b.attn
                b.attn = FusedSelfAttention(orig)
                swapped.append((b, orig))
        yield len(swapped)
    finally:
        for b, orig in swapped:
            b.attn = orig


class TraceableSelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (with its attn_mask) in ops that keep the sequence
    length symbolic under tracing: reshapes use -1 for it."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("traceable attention needs a packed in_proj (q, k, v of one width)")
        self.original = mha
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False, attn_mask=None):
        if key is not query or value is not query:
            return self.original(query, key, value, need_weights=need_weights, attn_mask=attn_mask)
        m = self.original
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, D)
        n, d = x.shape[0], x.shape[2]
        hd = d // self.num_heads
        split = lambda t: t.reshape(n, -1, self.num_heads, hd).transpose(1, 2)  # noqa: E731 (N, H, L, hd)
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)  # (N, H, L, hd)
        o = m.out_proj(o.transpose(1, 2).reshape(n, -1, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


@contextlib.contextmanager
def traceable_text_attention(backbone: Backbone):
    """Temporarily swap the text blocks' attention (restored on exit, even on error)."""
    blocks = backbone.text_blocks if backbone.text_supports_prompts else []
    swapped = []
    try:
        for b in blocks:
            if isinstance(getattr(b, "attn", None), nn.MultiheadAttention):
                orig = b.attn
                b.attn = TraceableSelfAttention(orig)
                swapped.append((b, orig))
        yield len(swapped)
    finally:
        for b, orig in swapped:
            b.attn = orig
