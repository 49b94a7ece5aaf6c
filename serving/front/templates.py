"""Prompt templates sent with a request ("a photo of a {}."), checked the way `str.format` reads
them (`string.Formatter().parse`, the standard library's own parser) before they are used.

A template is valid when it parses and has exactly one replacement field, the bare `{}`: no
index or attribute (`{0}`, `{0.__class__}`), no conversion (`{!r}`), no format spec
(`{:>99999}`). Literal braces are written `{{` and `}}`. Anything else -- an unmatched `}` as
in `"a {} }"` or `"{}}"` included -- is a 422 `invalid_template`, never a 500.
"""
from __future__ import annotations

import string
from typing import Any, Optional

MAX_TEMPLATE_CHARS = 200


def template_problem(template: Any) -> Optional[str]:
    """Why `template` is not a usable template, or None."""
    if not isinstance(template, str):
        return "templates are strings"
    if len(template) > MAX_TEMPLATE_CHARS:
        return f"a template is over {MAX_TEMPLATE_CHARS} characters"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # unmatched braces
        return f"{template[:60]!r} is not a valid template ({err})"
    if fields != [("", "", None)]:
        return f"{template[:60]!r}: a template has exactly one '{{}}' (no index, conversion or format spec)"
    return None


def check_templates(templates: Any, max_templates: int) -> Optional[tuple[str, str]]:
    """(error kind, detail) for a bad `templates` field, or None (None/[] means the default)."""
    if templates in (None, []):
        return None
    if not isinstance(templates, list) or len(templates) > max_templates:
        return "invalid_templates", f"'templates' is a list of at most {max_templates} strings"
    for t in templates:
        problem = template_problem(t)
        if problem:
            return "invalid_template", problem
    return None
