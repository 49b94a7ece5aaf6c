"""Pixels for training and evaluation: CLIP transforms from the backbone's PreprocessSpec.

Train: RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip + normalize (Dassl's CLIP
recipe). Test: resize the short side, center crop, normalize. Images are decoded lazily with a
pixel cap so one hostile file cannot exhaust memory.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..backbone import PreprocessSpec
from .records import Sample

MAX_TRAIN_PIXELS = 40_000_000


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        name, InterpolationMode.BICUBIC
    )


def build_transform(spec: PreprocessSpec, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if train:
        return T.Compose([
            T.RandomResizedCrop(spec.image_size, scale=crop_scale, interpolation=_interp(spec.interpolation)),
            T.RandomHorizontalFlip(),
            *norm,
        ])
    return T.Compose([
        T.Resize(spec.image_size, interpolation=_interp(spec.interpolation)),
        T.CenterCrop(spec.image_size),
        *norm,
    ])


def open_rgb(path: str, max_pixels: int = MAX_TRAIN_PIXELS) -> Image.Image:
    img = Image.open(path)
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{path}: {w}x{h} exceeds the {max_pixels:,}-pixel cap")
    return img.convert("RGB")


class SampleDataset(Dataset):
    """(image tensor, label) for a list of Samples."""

    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(open_rgb(s.path)), s.label


def make_loader(
    samples: Sequence[Sample], spec: PreprocessSpec, train: bool, batch_size: int, seed: int = 0, workers: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    # Dassl drops the last partial batch in training when at least one full batch exists.
    drop_last = train and len(samples) >= batch_size
    return DataLoader(
        SampleDataset(samples, build_transform(spec, train, crop_scale)),
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=workers,
        generator=gen,
        persistent_workers=workers > 0,
    )
