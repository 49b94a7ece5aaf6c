"""clipheads training: frozen open_clip backbones, head methods, data, the shared loop, artifacts.

Nothing here imports `clipheads.export` or `clipheads.serving` (data flows training -> export -> serving).
"""
from clipheads import __version__

__all__ = ["__version__"]
