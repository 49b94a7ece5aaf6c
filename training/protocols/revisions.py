"""Method code changes that alter results under an unchanged configuration.

A unit's resume key (`Recipe.unit_config`) holds every setting, but a fix inside a method (an
init, a gradient path) changes results while every setting stays the same. Such a fix bumps the
method's revision here, so results trained before it count as another configuration and are
refused (or recomputed) instead of being reported as done. A method with no entry is at its
first revision, which adds no key (results written before this table existed stay valid).
"""
from __future__ import annotations

# method -> (revision, what changed)
METHOD_REVISIONS: dict[str, tuple[int, str]] = {
    "maple": (2, "deep vision projections start as copies of one Linear, the official init (f0fbeb3)"),
}


def method_revision(method: str) -> dict:
    """{"method_revision": N} for a method with results-changing fixes, else {}."""
    entry = METHOD_REVISIONS.get(method)
    return {"method_revision": entry[0]} if entry else {}
