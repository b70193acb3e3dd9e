"""Demo data: a VTAB-1K tree in the NOAH layout made of real JPEG files whose labels can be learned.

    python -m gist_exp.data.fake --root data/demo --tasks dtd,eurosat --train 1000 --test 500

Each class has a fixed random 4x4 colour layout; an image is its class layout, upscaled, under a
random brightness shift and pixel noise. A model that learns reaches accuracy far above chance, one
that does not stays at chance, which is what the tests and `make demo` rely on.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .tasks import TASKS, canonical_task_name

GRID = 4


def class_layouts(task: str, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    return rng.integers(0, 256, size=(num_classes, GRID, GRID, 3)).astype(np.float32)


def render(layout: np.ndarray, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    rows = np.minimum(np.arange(height) * GRID // height, GRID - 1)
    cols = np.minimum(np.arange(width) * GRID // width, GRID - 1)
    pixels = layout[rows][:, cols]
    pixels = pixels + rng.uniform(-30, 30) + 20 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _write_image(job) -> None:
    path, layout, size, seed = job
    render(layout, *size, np.random.default_rng(seed)).save(path, quality=90)


def write_split(task_dir: Path, split: str, labels: np.ndarray, layouts: np.ndarray, size, seed: list[int],
                pool=None) -> None:
    image_dir = task_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rels = [f"images/{split}/{i:06d}.jpg" for i in range(len(labels))]
    # every image has its own seed, so the tree is the same however many processes write it
    jobs = [(task_dir / rel, layouts[label], size, [*seed, zlib.crc32(split.encode()), i])
            for i, (rel, label) in enumerate(zip(rels, labels))]
    if pool is None:
        for job in jobs:
            _write_image(job)
    else:
        pool.map(_write_image, jobs, chunksize=64)
    (task_dir / f"{split}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in zip(rels, labels)))


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def make_task(root: Path, task: str, train: int, test: int, size=(64, 48), seed: int = 0, workers: int = 1) -> Path:
    """Write <root>/<task> with train800 / val200 (an 80/20 split of `train`), train800val200 (its own
    copy of both) and test."""
    spec = TASKS[task]
    base_seed = [seed, zlib.crc32(task.encode())]
    rng = np.random.default_rng(base_seed)
    layouts = class_layouts(task, spec.num_classes)
    n_train = max(1, round(train * 0.8))
    labels = balanced_labels(train, spec.num_classes, rng)
    test_labels = balanced_labels(test, spec.num_classes, rng)
    task_dir = Path(root) / task
    splits = {"train800": labels[:n_train], "val200": labels[n_train:], "train800val200": labels, "test": test_labels}
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for split, split_labels in splits.items():
            write_split(task_dir, split, split_labels, layouts, size, base_seed, pool)
    finally:
        if pool:
            pool.close()
            pool.join()
    return task_dir


def parse_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="where to write the tree")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all 19)")
    parser.add_argument("--train", type=int, default=1000, help="images in train800val200 (default 1000)")
    parser.add_argument("--test", type=int, default=500, help="test images per task (default 500)")
    parser.add_argument("--size", type=parse_size, default=(64, 48), help="JPEG size WxH (default 64x48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing JPEGs")
    args = parser.parse_args(argv)
    try:
        tasks = [canonical_task_name(t) for t in args.tasks.split(",") if t]
    except ValueError as e:
        parser.error(str(e))
    for task in tasks:
        path = make_task(args.root, task, args.train, args.test, args.size, args.seed, args.workers)
        print(f"wrote {path} ({args.train} train, {args.test} test, {TASKS[task].num_classes} classes)")


if __name__ == "__main__":
    main()
