"""Pixels for training and evaluation, through the one preprocessing path (training/preprocess.py).

Train: decode + EXIF orientation + RGB (`oriented_rgb`), then RandomResizedCrop(scale 0.08-1,
bicubic) + horizontal flip + normalize (Dassl's CLIP recipe). Test: `prepare_pixels` (the exact
uint8 pixels the server, batch scoring and the Predictor compute) then normalize. Files are
opened lazily with a pixel cap so one hostile file cannot exhaust memory.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..preprocess import PreprocessSpec, open_image, oriented_rgb, prepare_pixels
from .readers._common import DatasetLayoutError
from .records import Sample

MAX_TRAIN_PIXELS = 40_000_000


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        name, InterpolationMode.BICUBIC
    )


class OrientedRGB:
    """Transform: a lazily opened image -> EXIF-oriented RGB at full resolution (augmentation input)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return oriented_rgb(img)


class CanonicalPixels:
    """Transform: a lazily opened image -> normalised (3, S, S) float tensor of `prepare_pixels`."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self._mean = torch.tensor(spec.mean).view(3, 1, 1)
        self._std = torch.tensor(spec.std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(prepare_pixels(img, self.spec)).float().div_(255.0)
        return (x - self._mean) / self._std


def build_transform(spec: PreprocessSpec, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    from torchvision import transforms as T

    if train:
        return T.Compose([
            OrientedRGB(),
            T.RandomResizedCrop(spec.image_size, scale=crop_scale, interpolation=_interp(spec.interpolation)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ])
    return T.Compose([CanonicalPixels(spec)])


class SampleDataset(Dataset):
    """(image tensor, label) for a list of Samples."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, max_pixels: int = MAX_TRAIN_PIXELS):
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:  # decoding may fail only in the transform (Pillow reads lazily): both are the file's fault
            return self.transform(open_image(s.path, self.max_pixels)), s.label
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImage(f"{s.path}: cannot read this image ({type(err).__name__}: {err}); "
                                  "remove it from the data or replace it") from None


class UnreadableImage(DatasetLayoutError):
    """A listed image that does not decode (truncated, empty, not an image): named, exit 2."""


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
