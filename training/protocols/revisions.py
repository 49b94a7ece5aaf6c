"""Method code changes that alter results under an unchanged configuration.

A unit's resume key (`Recipe.unit_config`) holds every setting, but a fix inside a method (an
init, a gradient path) or in the protocol runner changes results while every setting stays the
same. Such a fix bumps the method's revision here (a runner fix: RUNNER_REVISION), so results
trained before it count as another configuration and are refused (or recomputed) instead of
being reported as done. A method with no entry is at its first revision and adds no key.
"""
from __future__ import annotations

# The runner's own results-changing fixes (every method): 2 = a unit's head is initialised from
# its seed (before, from whatever RNG state earlier units in the process left, so a resumed run
# could differ from an uninterrupted one).
RUNNER_REVISION = 2

# method -> (revision, what changed)
METHOD_REVISIONS: dict[str, tuple[int, str]] = {
    "maple": (2, "deep vision projections start as copies of one Linear, the official init (f0fbeb3)"),
}


def method_revision(method: str) -> dict:
    """{"runner_revision": R, "method_revision": N} (N only for a method with results-changing fixes)."""
    entry = METHOD_REVISIONS.get(method)
    return {"runner_revision": RUNNER_REVISION, **({"method_revision": entry[0]} if entry else {})}
