"""Decode once: each (task, split, image size) is decoded and resized once into a uint8 cache on disk.

A cache entry is a directory `<cache_dir>/<task>/<split>-<size>px-<key>/` holding `images.npy`
(N, 3, S, S) uint8, `labels.npy` and `meta.json`. It is built in a temporary directory and renamed
into place in one step, so an interrupted or concurrent build never leaves an entry that reads as
complete. The key covers the list file, each image's size and mtime, the resize and Pillow's version,
so a changed dataset or decoder builds a new entry instead of reusing stale pixels.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from torch.utils.data import DataLoader

from ..errors import DataError
from .images import INTERPOLATION, DecodedImages
from .vtab import SplitList, format_problems

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class CachedSplit:
    images: np.ndarray  # (N, 3, S, S) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64
    path: Path


def cache_key(split: SplitList, image_size: int) -> str:
    digest = hashlib.sha256()
    header = dict(format=CACHE_FORMAT, pillow=PIL.__version__, size=image_size, interpolation=INTERPOLATION)
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(split.list_file.read_bytes())
    for path in split.paths:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def entry_dir(cache_dir: Path, split: SplitList, image_size: int) -> Path:
    return Path(cache_dir) / split.task.name / f"{split.split}-{image_size}px-{cache_key(split, image_size)}"


def load_entry(directory: Path) -> CachedSplit:
    images = np.load(directory / "images.npy", mmap_mode="r")
    labels = np.load(directory / "labels.npy")
    return CachedSplit(images, labels, directory)


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Serialise builders of one entry (same host; on filesystems without flock the rename still keeps it safe)."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def cached_split(
    split: SplitList, cache_dir: Path, image_size: int, num_workers: int = 4, list_all_errors: bool = False
) -> CachedSplit:
    """Return the cache entry for `split`, building it first if needed."""
    directory = entry_dir(cache_dir, split, image_size)
    if directory.is_dir():
        return load_entry(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if directory.is_dir():  # built by a concurrent job while we waited
            return load_entry(directory)
        build_entry(split, directory, image_size, num_workers, list_all_errors)
    return load_entry(directory)


def build_entry(split: SplitList, directory: Path, image_size: int, num_workers: int, list_all_errors: bool) -> None:
    start = time.perf_counter()
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(split), 3, image_size, image_size)
        )
        errors = decode_into(images, split, image_size, num_workers)
        if errors:
            raise DataError(
                f"{len(errors)} image(s) of {split.task.name}/{split.split} cannot be decoded:\n"
                f"{format_problems(errors, list_all_errors)}\nReplace or remove these files."
            )
        images.flush()
        del images
        np.save(tmp / "labels.npy", np.asarray(split.labels, dtype=np.int64))
        meta = dict(task=split.task.name, split=split.split, n=len(split), image_size=image_size,
                    list_file=str(split.list_file), pillow=PIL.__version__, format=CACHE_FORMAT)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for name in ("images.npy", "labels.npy", "meta.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, directory)  # the single step that makes the entry visible
        except OSError:
            if not directory.is_dir():  # otherwise another host finished the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s/%s: %d images in %.1fs -> %s", split.task.name, split.split, len(split),
             time.perf_counter() - start, directory)


def decode_into(out: np.ndarray, split: SplitList, image_size: int, num_workers: int) -> list[str]:
    """Decode every image of `split` into `out` with DataLoader workers; return the decode errors."""
    # its own generator: building the cache must not move the global RNG that dropout draws from,
    # or a run would train differently depending on whether the cache already existed
    loader = DataLoader(DecodedImages(split, image_size), batch_size=32, num_workers=num_workers,
                        collate_fn=_stack, generator=torch.Generator().manual_seed(0))
    errors, position = [], 0
    for images, batch_errors in loader:
        out[position:position + len(images)] = images.numpy()
        position += len(images)
        errors.extend(batch_errors)
    return errors


def _stack(items):
    images = torch.stack([image for image, _, _ in items])
    return images, [error for _, _, error in items if error]
