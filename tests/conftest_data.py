"""Builders of miniature dataset trees (a few tiny real images per class) in each reader's layout."""
from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image


@lru_cache(maxsize=None)
def image_bytes(fmt: str = "PNG") -> bytes:
    """A real 4x4 image, encoded once and copied: readers never decode, the loader could."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(fmt))
    return path


def write_images(directory: Path, n: int, ext: str = "jpg", prefix: str = "img") -> list[Path]:
    return [write_image(directory / f"{prefix}_{i:03d}.{ext}") for i in range(n)]


def write_split_zhou(
    split_file: Path, image_root: Path, classes: Sequence[str], counts: tuple[int, int, int] = (3, 2, 2), ext: str = "jpg"
) -> dict:
    """Images at image_root/<class folder>/<split>_<i>.<ext>; JSON rows [rel, label, classname]."""
    data: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(classes):
        folder = cname.replace(" ", "_").replace("/", "_")
        for split, n in zip(data, counts):
            for i in range(n):
                rel = f"{folder}/{split}_{i}.{ext}"
                write_image(image_root / rel)
                data[split].append([rel, label, cname])
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps(data, indent=4))
    return data


def write_classnames(path: Path, table: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in table.items()))


def wnids(n: int) -> dict[str, str]:
    """n fake ImageNet wnids -> names, in sorted wnid order (as CoOp's classnames.txt)."""
    return {f"n{i:08d}": f"class_{i} name" for i in range(n)}


def make_synthetic_world(out: Path, domains: Sequence[str], classes: Sequence[str], counts=(3, 1, 2)) -> Path:
    """The layout `clipheads data synth OUT` writes (only what the reader relies on)."""
    out.mkdir(parents=True, exist_ok=True)
    world = {"seed": 7, "domains": [{"name": d} for d in domains], "classes": list(classes)}
    (out / "world.json").write_text(json.dumps(world))
    for d in domains:
        write_split_zhou(out / "splits" / f"{d}.json", out / d, classes, counts, ext="png")
    return out
