"""Head methods: one small module per method on the shared machinery in `base`.

`BUILTIN_METHOD_MODULES` is the explicit list of the package's own method modules; the registry
imports exactly these (a method registers itself with `@register_method`).
"""
BUILTIN_METHOD_MODULES = (
    "zeroshot",
    "coop",
    "cocoop",
    "vpt",
    "ivlp",
    "maple",
    "comma",
    "mma",
    "mmap",
)

from .base import (  # noqa: E402
    HeadMethod,
    MethodConfig,
    MethodError,
    TaskSpec,
    build_method,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "HeadMethod", "MethodConfig", "MethodError", "TaskSpec",
    "build_method", "get_method", "list_methods", "register_method",
]
