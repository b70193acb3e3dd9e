"""Batch iterables. Every loader yields (uint8 images (B, 3, S, S), int64 labels (B,)).

- `DeviceBatches`: the decoded training set lives on the device; a batch is an index_select.
- `StreamingBatches`: evaluation sets stream from the memory-mapped cache in large pinned batches.
- `pil_loader`: the reference pipeline, decoding every image with PIL in DataLoader workers every epoch.

Both training loaders draw the same permutation per (seed, epoch), so the two pipelines see batches
in the same order; Lightning calls `sampler.set_epoch` at the start of each epoch.
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

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
        self.sampler = EpochShuffle(len(labels), seed)  # Lightning calls sampler.set_epoch each epoch
        self.batch_sampler = None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self.sampler.permutation()
        if self.images.is_cuda:  # a copy from pageable memory would wait for the device to finish its queue
            order = order.pin_memory()
        order = order.to(self.images.device, non_blocking=True)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)


class StreamingBatches:
    """Evaluation batches read in order from the cache file by one background thread, straight into
    (optionally pinned) memory with one read per batch, a couple of batches ahead of the device."""

    def __init__(self, images_path, labels: np.ndarray, batch_size: int, pin_memory: bool, prefetch: int = 3):
        self.images_path = images_path
        self.labels = labels
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self.sampler = None  # sequential: nothing for Lightning to set
        self.batch_sampler = None

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def _batch(self, fd: int, layout: np.memmap, i: int):
        start = i * self.batch_size
        rows = min(self.batch_size, len(self.labels) - start)
        images = torch.empty((rows, *layout.shape[1:]), dtype=torch.uint8, pin_memory=self.pin_memory)
        buffer = memoryview(images.numpy()).cast("B")
        offset = layout.offset + start * layout[0].nbytes
        done = 0
        while done < buffer.nbytes:  # a read may return less than asked
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise DataError(f"{self.images_path} ends early: delete its cache entry to rebuild it")
            done += got
        return images, torch.from_numpy(self.labels[start:start + rows])

    def __iter__(self):
        layout = np.load(self.images_path, mmap_mode="r")  # the header: shape and data offset
        if layout.dtype != np.uint8 or not layout.flags.c_contiguous:
            raise DataError(f"{self.images_path} is not a uint8 C-order array: delete its cache entry to rebuild it")
        fd = os.open(self.images_path, os.O_RDONLY)
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def hand_over(item) -> bool:
            """Queue `item` unless the consumer has gone (then a blocking put would never return)."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for i in range(len(self)):
                    if not hand_over(self._batch(fd, layout, i)):
                        return
            except BaseException as e:  # handed to the consumer, which raises it
                hand_over(e)
                return
            hand_over(None)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()
            os.close(fd)


class _RaiseDecodeErrors:
    """Wraps a PIL DataLoader: decode errors from the workers become one DataError in the main process."""

    def __init__(self, loader: DataLoader, split: SplitList):
        self.loader = loader
        self.split = split
        self.sampler = loader.sampler  # Lightning calls sampler.set_epoch each epoch
        self.batch_sampler = None

    def __len__(self) -> int:
        return len(self.loader)

    def close_workers(self) -> None:
        """End persistent workers (dropping the iterator shuts them down), so that another loader's
        workers are not forked from a process that still feeds these ones."""
        self.loader._iterator = None

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
        generator=torch.Generator().manual_seed(shuffle_seed or 0),  # the global RNG stays the model's
        persistent_workers=num_workers > 0 and shuffle_seed is not None,  # training: workers live across epochs
    )
    return _RaiseDecodeErrors(loader, split)
