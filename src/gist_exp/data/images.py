"""Decoding: the reference preprocessing of the GIST/NOAH VTAB-1K code, stopped before the float conversion.

Reference: `Image.open(p).convert("RGB")` -> `Resize((S, S), BICUBIC)` -> `ToTensor()` -> `Normalize(mean, std)`.
Here images stay uint8 (3, S, S) after the resize, so they can be cached once; `Normalize` in
`gist_exp.module` then does `ToTensor` + `Normalize` on the device with the same arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, Resize

from .vtab import SplitList

INTERPOLATION = "bicubic"


def decode_image(path, image_size: int) -> np.ndarray:
    """One image as uint8 (3, S, S): grayscale, RGBA, CMYK and palette images are converted to RGB."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")  # also forces the full decode, so truncated files fail here
    resized = Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)(rgb)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).copy()


class DecodedImages(Dataset):
    """Items are (uint8 image (3, S, S), label, error). A bad file gives a zero image and its error text,
    so that one pass can name every bad file; callers turn errors into a DataError."""

    def __init__(self, split: SplitList, image_size: int):
        self.split = split
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        path = self.split.paths[index]
        label = self.split.labels[index]
        try:
            image = decode_image(path, self.image_size)
            error = ""
        except Exception as e:  # PIL raises several types for corrupt, truncated or unknown files
            image = np.zeros((3, self.image_size, self.image_size), np.uint8)
            error = f"{path}: cannot decode ({type(e).__name__}: {e}); listed in {self.split.where(index)}"
        return torch.from_numpy(image), label, error
