"""LightningDataModule for one VTAB-1K task. Batches are uint8; normalisation happens on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ..errors import ConfigError
from .cache import CachedSplit, cached_split
from .loaders import DeviceBatches, StreamingBatches, pil_loader
from .tasks import Task
from .vtab import SplitList, load_protocol

PIPELINES = ("cached", "pil")


class VTabDataModule(pl.LightningDataModule):
    """`pipeline="cached"`: decode once into the on-disk cache, training set on the device, evaluation
    set streamed from the cache. `pipeline="pil"`: the reference path, PIL decoding every epoch."""

    def __init__(
        self,
        root: str | Path,
        task: Task,
        protocol: str = "final",
        image_size: int = 224,
        pipeline: str = "cached",
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 8,
        drop_last: bool = True,
        seed: int = 0,
        list_all_errors: bool = False,
    ):
        super().__init__()
        if pipeline not in PIPELINES:
            raise ConfigError(f"data.pipeline={pipeline!r} is not one of {PIPELINES}")
        self.root = Path(root).expanduser()
        self.task = task
        self.protocol = protocol
        self.image_size = image_size
        self.pipeline = pipeline
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / "_cache"
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.seed = seed
        self.list_all_errors = list_all_errors
        self.train_split: SplitList | None = None
        self.eval_split: SplitList | None = None
        self._cache: dict[str, CachedSplit] = {}
        self._pil_train = None

    def validate(self) -> None:
        """Check the tree (directories, lists, labels, image files) before anything is trained."""
        if self.train_split is None:
            self.train_split, self.eval_split = load_protocol(self.root, self.task, self.protocol, self.list_all_errors)

    def setup(self, stage: str | None = None) -> None:
        self.validate()
        if self.pipeline == "cached" and not self._cache:
            for split in (self.train_split, self.eval_split):
                self._cache[split.split] = cached_split(
                    split, self.cache_dir, self.image_size, self.num_workers, self.list_all_errors
                )

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_dataloader(self):
        if self.pipeline == "pil":
            self._pil_train = pil_loader(self.train_split, self.image_size, self.batch_size, self.num_workers,
                                         self.device.type == "cuda", shuffle_seed=self.seed, drop_last=self.drop_last)
            return self._pil_train
        cache = self._cache[self.train_split.split]
        images = torch.from_numpy(np.array(cache.images)).to(self.device)  # a writable in-memory copy
        labels = torch.from_numpy(cache.labels).to(self.device)
        return DeviceBatches(images, labels, self.batch_size, self.seed, self.drop_last)

    def eval_dataloader(self):
        pin = self.device.type == "cuda"
        if self.pipeline == "pil":
            if self._pil_train is not None:
                self._pil_train.close_workers()
            return pil_loader(self.eval_split, self.image_size, self.eval_batch_size, self.num_workers, pin)
        cache = self._cache[self.eval_split.split]
        return StreamingBatches(cache.path / "images.npy", cache.labels, self.eval_batch_size, pin)

    # Lightning's names: evaluation during training (eval.every_n_epochs) and the final test.
    val_dataloader = eval_dataloader
    test_dataloader = eval_dataloader
