"""How the text tower reads a class name, in plain Python (the HTTP front imports this without torch).

open_clip's tokenizer unescapes HTML, fixes Unicode (ftfy), cleans whitespace and lowercases, and
our prompt builders turn '_' into a space, so two names with one `classname_key` get one prompt, one text embedding, and tie on every
image: readers warn about such pairs in training data, the front refuses them in a request.
"""
from __future__ import annotations

import functools
import html
import unicodedata
from typing import Sequence


def clean_classname(name: str) -> str:
    """What the text tower reads: underscores become spaces (as CoOp's prompt learners do)."""
    return " ".join(name.replace("_", " ").split())


def classname_key(name: str) -> str:
    """Equal for two names the text tower cannot tell apart: open_clip's tokenizer cleaning
    (`tokenizer_text`), then our '_', spacing and case."""
    return clean_classname(tokenizer_text(name)).casefold()


@functools.lru_cache(maxsize=4096)  # the front checks every label of every request before its text cache
def tokenizer_text(text: str) -> str:
    """What open_clip's tokenizer makes of `text` before it splits words (its `basic_clean`): ftfy's
    `fix_text` (fullwidth letters, ligatures, composed accents; skipped for ASCII, which it leaves
    alone), then HTML entities unescaped twice. Without ftfy installed, NFC stands in for it."""
    if not text.isascii():
        try:
            import ftfy
        except ImportError:
            text = unicodedata.normalize("NFC", text)
        else:
            text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text))


def alike_classnames(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs (first seen, later) of names with one `classname_key`."""
    first: dict[str, str] = {}
    pairs = []
    for name in names:
        key = classname_key(name)
        if key in first:
            pairs.append((first[key], name))
        else:
            first[key] = name
    return pairs
