"""Free-text labels of a request (zero-shot labels, few-shot task classes), checked before any
text is encoded; `Predictor.zero_shot` applies the same rules in-process.

A label is a non-empty string (stripped), at most `max_chars` long; no two labels may read the same
to the text encoder (`training.classnames.classname_key`: case, '_' and spacing ignored), since
they would get one embedding and tie on every image.
"""
from __future__ import annotations

from typing import Any, Optional

from clipheads.training.classnames import classname_key


def clean_labels(labels: Any, max_labels: Optional[int] = None, max_chars: Optional[int] = None,
                 what: str = "labels") -> tuple[list[str], Optional[tuple[str, str]]]:
    """(stripped labels, None), or ([], (error kind, detail)) for a bad `labels` field."""
    if not isinstance(labels, list) or not labels:
        return [], ("invalid_labels", f"'{what}' must be a non-empty list of strings")
    if max_labels is not None and len(labels) > max_labels:
        return [], ("too_many_labels", f"{len(labels)} labels; at most {max_labels}")
    out = []
    for lab in labels:
        if not isinstance(lab, str) or not lab.strip():
            return [], ("invalid_labels", f"'{what}' must be non-empty strings")
        if max_chars is not None and len(lab) > max_chars:
            return [], ("label_too_long", f"a label is over {max_chars} characters")
        out.append(lab.strip())
    seen: dict[str, str] = {}
    for lab in out:
        key = classname_key(lab)
        if key in seen:
            return [], ("duplicate_labels", f"'{what}' holds {seen[key][:40]!r} and {lab[:40]!r}, which read the "
                        "same to the text encoder (case, '_' and spacing are ignored)")
        seen[key] = lab
    return out, None
