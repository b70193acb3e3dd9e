"""Batch iterables. Every loader yields (uint8 images (B, 3, S, S), int64 labels (B,)).

- `DeviceBatches`: the decoded training set lives on the device; a batch is an index_select.
- `StreamingBatches`: evaluation sets stream from the memory-mapped cache in large pinned batches.
- `pil_loader`: the reference pipeline, decoding every image with PIL in DataLoader workers every epoch.

Both training loaders draw the same permutation per (seed, epoch), so the two pipelines see batches
in the same order; Lightning calls `sampler.set_epoch` at the start of each epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .images import DecodedImages
from .vtab import SplitList, format_problems


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self):
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.size


class DeviceBatches:
    """Shuffled training batches sliced from tensors already on the device: no host work per step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, drop_last: bool):
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = EpochShuffle(len(labels), seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self.sampler.permutation().to(self.images.device, non_blocking=True)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)


class _CachedSlices(Dataset):
    """Item i is batch i of a memory-mapped cache: one contiguous read per batch."""

    def __init__(self, images_path, labels: np.ndarray, batch_size: int):
        self.images_path = images_path
        self.labels = labels
        self.batch_size = batch_size
        self._images = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __getitem__(self, i: int):
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return torch.from_numpy(np.array(self._images[rows])), torch.from_numpy(self.labels[rows])


def streaming_batches(images_path, labels: np.ndarray, batch_size: int, num_workers: int, pin_memory: bool):
    return DataLoader(
        _CachedSlices(images_path, labels, batch_size),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


class _RaiseDecodeErrors:
    """Wraps a PIL DataLoader: decode errors from the workers become one DataError in the main process."""

    def __init__(self, loader: DataLoader, split: SplitList):
        self.loader = loader
        self.split = split
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, errors in self.loader:
            errors = [e for e in errors if e]
            if errors:
                raise DataError(
                    f"image(s) of {self.split.task.name}/{self.split.split} cannot be decoded:\n"
                    f"{format_problems(errors, True)}\nReplace or remove these files."
                )
            yield images, labels


def pil_loader(split: SplitList, image_size: int, batch_size: int, num_workers: int, pin_memory: bool,
               shuffle_seed: int | None = None, drop_last: bool = False):
    sampler = EpochShuffle(len(split), shuffle_seed) if shuffle_seed is not None else None
    loader = DataLoader(
        DecodedImages(split, image_size),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
    return _RaiseDecodeErrors(loader, split)
