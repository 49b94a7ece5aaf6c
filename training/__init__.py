"""clipheads training: frozen open_clip backbones, head methods, data, the shared loop, artifacts.

Nothing here imports `export` or `serving` (data flows training -> export -> serving).
"""
__version__ = "0.1.0"
