"""CoOp-style text prompts: placeholder sentences whose context slots take learned vectors.

A placeholder sentence (`"X X X X {class}."`, or an init phrase such as `"a photo of a {class}."`)
is tokenized once per class list. Its frozen word embeddings are the canvas; the learned
context vectors are spliced into the slot positions. Because the slots already exist in the
placeholder, the EOT position (argmax of the token ids) never moves (METHODS.md 0.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..backbone import Backbone

POSITIONS = ("end", "middle", "front")


def clean_classname(name: str) -> str:
    return name.replace("_", " ")


@dataclass(frozen=True)
class PlaceholderBatch:
    tokens: Tensor  # (C, L) token ids of the placeholder sentences
    slots: Tensor  # (C, M) positions of the context vectors in each sentence


class TextPromptBuilder:
    """Builds and caches placeholder sentences for class lists; splices context vectors.

    n_ctx: number of learned vectors M. init_phrase: words whose embeddings initialise the
    context; the placeholder then contains the *whole* phrase and only its first M tokens are
    learned (MaPLe's "a photo of a" with M=2 keeps "of a" fixed). position: where the class
    name goes relative to the context (CoOp's CLASS_TOKEN_POSITION).
    """

    def __init__(self, backbone: Backbone, n_ctx: int, init_phrase: Optional[str] = None, position: str = "end",
                 suffix_phrase: Optional[str] = None):
        """suffix_phrase: frozen words kept between the learned slots and the class name
        ("X X .. X a photo of a {class}."), so randomly initialised slots start next to a working
        hand-crafted template instead of replacing it."""
        if suffix_phrase and (init_phrase or position != "end"):
            raise ValueError("a suffix phrase goes with random-init context at position 'end'")
        if position not in POSITIONS:
            raise ValueError(f"class token position must be one of {POSITIONS}, got {position!r}")
        if init_phrase and position != "end":
            raise ValueError("an init phrase places the context before the class name: use position='end'")
        backbone.require_text_tower("text prompts")
        self.backbone = backbone
        self.n_ctx = n_ctx
        self.init_phrase = init_phrase.strip() if init_phrase else None
        self.position = position
        self.suffix_phrase = suffix_phrase.strip() if suffix_phrase else None
        if self.init_phrase is not None:
            n_phrase = self._n_tokens(self.init_phrase)
            if n_ctx > n_phrase:
                raise ValueError(f"n_ctx={n_ctx} exceeds the {n_phrase} tokens of init phrase {self.init_phrase!r} "
                                 f"(ctx_init=null: {n_ctx} randomly initialised vectors)")
        self._cache: dict[tuple[str, ...], PlaceholderBatch] = {}

    def _n_tokens(self, text: str) -> int:
        tok = self.backbone.tokenize([text])[0]
        return int(tok.argmax()) - 1  # EOT is the largest id; minus SOT

    def init_vectors(self) -> Optional[Tensor]:
        """(M, D) word embeddings of the init phrase's first M tokens, or None for random init."""
        if self.init_phrase is None:
            return None
        tok = self.backbone.tokenize([self.init_phrase])
        with torch.no_grad():
            emb = self.backbone.embed_tokens(tok)[0]  # (L, D)
        return emb[1 : 1 + self.n_ctx].clone()

    def placeholders(self, classnames: Sequence[str]) -> PlaceholderBatch:
        key = tuple(classnames)
        if key not in self._cache:
            self._cache[key] = self._build(key)
        return self._cache[key]

    def _build(self, classnames: tuple[str, ...]) -> PlaceholderBatch:
        m, half = self.n_ctx, self.n_ctx // 2
        sentences, slots = [], []
        for raw in classnames:
            name = clean_classname(raw)
            if self.init_phrase is not None:
                sentences.append(f"{self.init_phrase} {name}.")
                slots.append(list(range(1, 1 + m)))
                continue
            n_name = self._n_tokens(name)
            x = lambda k: " ".join(["X"] * k)  # noqa: E731 - one placeholder word per slot
            if self.position == "end":
                words = f"{self.suffix_phrase} {name}" if self.suffix_phrase else name
                sentences.append(f"{x(m)} {words}.")
                slots.append(list(range(1, 1 + m)))
            elif self.position == "front":
                sentences.append(f"{name} {x(m)}.")
                slots.append(list(range(1 + n_name, 1 + n_name + m)))
            else:  # middle: half the context, the class, the other half
                sentences.append(f"{x(half)} {name} {x(m - half)}.".replace("  ", " "))
                slots.append(list(range(1, 1 + half)) + list(range(1 + half + n_name, 1 + m + n_name)))
        tokens = self.backbone.tokenize(sentences)
        slot_t = torch.tensor(slots, dtype=torch.long)
        if int(slot_t.max()) >= tokens.shape[1] - 1:
            raise ValueError("a class name is too long for the context length once the prompt is added")
        return PlaceholderBatch(tokens=tokens, slots=slot_t)

    def embed(self, classnames: Sequence[str], ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Splice ctx (M, D) shared, or (C, M, D) per class, into the placeholders.

        Returns (tokens (C, L), embeddings (C, L, D))."""
        ph = self.placeholders(classnames)
        tokens = ph.tokens.to(ctx.device)
        with torch.no_grad():
            canvas = self.backbone.embed_tokens(tokens)  # (C, L, D) frozen word embeddings
        c = tokens.shape[0]
        ctx = ctx.unsqueeze(0).expand(c, -1, -1) if ctx.dim() == 2 else ctx  # (C, M, D)
        rows = torch.arange(c, device=ctx.device).unsqueeze(1).expand_as(ph.slots)
        emb = canvas.to(ctx.dtype).index_put((rows, ph.slots.to(ctx.device)), ctx)
        return tokens, emb
