"""How the text tower reads a class name, in plain Python (the HTTP front imports this without torch).

open_clip's tokenizer cleans whitespace and lowercases, and our prompt builders turn '_' into a
space, so two names with one `classname_key` get one prompt, one text embedding, and tie on every
image: readers warn about such pairs in training data, the front refuses them in a request.
"""
from __future__ import annotations

from typing import Sequence


def clean_classname(name: str) -> str:
    """What the text tower reads: underscores become spaces (as CoOp's prompt learners do)."""
    return " ".join(name.replace("_", " ").split())


def classname_key(name: str) -> str:
    """Equal for two names the text tower cannot tell apart (case, '_' and spacing ignored)."""
    return clean_classname(name).casefold()


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
