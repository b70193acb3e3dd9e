"""The LightningModule: loss, optimiser, the GIST recipe's schedule, evaluation, trainable-only checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import CheckpointError, NonFiniteLossError
from .models import PeftViT, gist_loss


# Evaluation's attention: any backend but cuDNN, i.e. flash attention on a GPU. On an H200, in a new process, the
# first cuDNN attention call at an evaluation batch size took 0.45-1.09 s and flash's 0.09-0.56 s. Then batches of 512
# run alike, and a test set's odd-sized last batch (344 images) took 0.08-0.11 s with cuDNN against 0.05 s with flash
# (benchmarks/RESULTS.md). Training keeps torch's choice (cuDNN there), which is 6% faster per step.
EVAL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Schedule:
    """timm's CosineLRScheduler as the official script runs it, stepped per epoch: linear warmup from
    `warmup_lr`, cosine over `epochs`, then `cooldown_epochs` at `min_lr`. A run with a different
    `max_epochs` gets the same curve compressed or stretched to its length."""

    epochs: int = 100
    warmup_epochs: int = 10
    cooldown_epochs: int = 10
    warmup_lr: float = 1e-7
    min_lr: float = 1e-8

    @property
    def length(self) -> int:
        return self.epochs + self.cooldown_epochs

    def lr(self, epoch: int, base_lr: float, max_epochs: int | None = None) -> float:
        t = epoch * self.length / (max_epochs or self.length)
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (base_lr - self.warmup_lr) / self.warmup_epochs
        if t < self.epochs:
            return self.min_lr + 0.5 * (base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.epochs))
        return self.min_lr


@dataclass
class LossWeights:
    ce_weight: float = 0.5
    kl_weight: float = 0.75
    temperature: float = 3.0


@dataclass
class EpochEnd:
    """A training epoch's results that are still on the device (or in flight to the host)."""

    epoch: int
    step: int  # the epoch's last optimizer step, where its metrics are logged
    first_bad_step: torch.Tensor  # host copy: the first optimizer step with a non-finite loss, or -1
    loss: torch.Tensor  # host copy: the epoch's mean loss
    lr: float
    start: float | torch.cuda.Event
    end: float | torch.cuda.Event
    images: int


class GistModule(pl.LightningModule):
    def __init__(self, model: PeftViT, lr: float, weight_decay: float, schedule: Schedule,
                 loss: LossWeights | None = None, compile: bool = False):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.loss_weights = loss or LossWeights()
        self.strict_loading = False  # checkpoints hold the trainable parameters only
        self.eval_history: list[tuple[int, float]] = []  # (epoch, accuracy %) when evaluated during training
        self.test_acc: float | None = None
        self.eval_images_per_s: float | None = None  # after the first batch of the last evaluation
        self.config_hash: str | None = None  # set by the entry point; a checkpoint of another config is refused
        self.epoch_seconds: list[float] = []  # each training epoch's time, CUDA events on a GPU (the first compiles)
        self.train_images = 0
        self._unsettled: EpochEnd | None = None  # the last epoch, until its device results are read
        self._first_bad_step: torch.Tensor | None = None  # the epoch under way's, on the device
        if compile:
            # On a GPU the eager step is bound by the host issuing kernels (benchmarks/RESULTS.md), so
            # CUDA graphs replay the compiled part.
            self.model.compile_tokens("cuda-graphs" if torch.cuda.is_available() else "default")

    # ---- training -------------------------------------------------------------------------------
    def loss(self, cls_logits, gist_logits, labels):
        if gist_logits is None:
            return F.cross_entropy(cls_logits.float(), labels)
        w = self.loss_weights
        return gist_loss(cls_logits, gist_logits, labels, w.ce_weight, w.kl_weight, w.temperature)

    def on_train_epoch_start(self) -> None:
        # device-side accumulators: nothing in the step waits for the device
        self._loss_sum = torch.zeros((), device=self.device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._steps = 0
        self._epoch_images = 0
        # read now: Lightning steps an epoch-interval scheduler after the last batch, before the epoch-end hook
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self._epoch_start = self._mark()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss(*self.model(images), labels)
        loss_value = loss.detach()
        bad = ~torch.isfinite(loss_value) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, self.global_step, self._first_bad_step)
        self._loss_sum += loss_value
        self._steps += 1
        self._epoch_images += labels.shape[0]
        return loss

    def on_train_epoch_end(self) -> None:
        # The host does not wait for this epoch: its non-finite check, loss and time are read (and logged)
        # at the next epoch's end, long finished by then, before any checkpoint is written, and when
        # training ends.
        self._settle()
        pinned = self.device.type == "cuda"  # elsewhere the copies are plain, blocking ones
        first_bad = torch.empty((), dtype=torch.long, pin_memory=pinned).copy_(self._first_bad_step, non_blocking=pinned)
        loss = torch.empty((), pin_memory=pinned).copy_(self._loss_sum / max(self._steps, 1), non_blocking=pinned)
        self._unsettled = EpochEnd(self.current_epoch, self.global_step - 1, first_bad, loss, self._epoch_lr,
                                   self._epoch_start, self._mark(), self._epoch_images)

    def on_train_end(self) -> None:
        self._settle()

    def _mark(self) -> float | torch.cuda.Event:
        """Now, on the device's stream (a CUDA event, read later without waiting) or on the host clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _settle(self) -> None:
        """Read the last finished epoch's results from the device: stop on a non-finite loss, record its time,
        log its loss and learning rate."""
        if self._unsettled is None:
            return
        pending, self._unsettled = self._unsettled, None
        if isinstance(pending.end, float):
            seconds = pending.end - pending.start
        else:
            pending.end.synchronize()  # recorded after the copies to the host
            seconds = pending.start.elapsed_time(pending.end) / 1e3
        self._raise_if_non_finite(int(pending.first_bad_step), pending.epoch)
        self.epoch_seconds.append(seconds)
        self.train_images += pending.images
        for logger in self.loggers:
            logger.log_metrics({"train/loss": float(pending.loss), "train/lr": pending.lr, "epoch": pending.epoch},
                               step=pending.step)
            logger.save()  # on disk now: a killed run keeps the log of its finished epochs

    @staticmethod
    def _raise_if_non_finite(first_bad_step: int, epoch: int) -> None:
        if first_bad_step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {first_bad_step} (epoch {epoch}); the run stops here and "
                f"earlier checkpoints are kept. Lower recipe.lr or check the data.")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=self.lr, fused=fused)
        max_epochs = self.trainer.max_epochs if self.trainer is not None else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: self.schedule.lr(epoch, self.lr, max_epochs) / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval_start(self):
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._count = 0
        self._after_first = None  # (time, images) once the first batch (and any compilation) is done

    def _eval_step(self, batch):
        images, labels = batch
        with sdpa_kernel(EVAL_ATTENTION):
            self._correct += (self.model.predict(images).argmax(-1) == labels).sum()
        self._count += labels.shape[0]
        if self._after_first is None:  # one sync per evaluation, for the steady-state rate
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._after_first = (time.perf_counter(), self._count)

    def _eval_accuracy(self) -> float:
        correct = int(self._correct)  # waits for the device
        if self._after_first is not None and self._count > self._after_first[1]:
            elapsed = time.perf_counter() - self._after_first[0]
            self.eval_images_per_s = (self._count - self._after_first[1]) / elapsed
        return 100.0 * correct / max(self._count, 1)

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        acc = self._eval_accuracy()
        self.eval_history.append((self.current_epoch, acc))
        self.log("eval/acc_during_training", acc)

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self.test_acc = self._eval_accuracy()
        self.log("eval/acc", self.test_acc)

    # ---- checkpoints: trainable parameters, RNG states, evaluation history ----------------------
    def trainable_names(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint never holds weights trained on a non-finite loss, whenever it is written
        self._settle()
        if self._first_bad_step is not None:  # the epoch under way (or just queued), read with a sync
            self._raise_if_non_finite(int(self._first_bad_step), self.current_epoch)
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["config_hash"] = self.config_hash
        checkpoint["eval_history"] = [list(e) for e in self.eval_history]
        checkpoint["epoch_seconds"] = list(self.epoch_seconds)
        checkpoint["train_images"] = self.train_images

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.config_hash and checkpoint.get("config_hash") not in (None, self.config_hash):
            raise CheckpointError(
                f"checkpoint was written by another configuration (config hash {checkpoint.get('config_hash')}, "
                f"this run {self.config_hash}); move the run's checkpoints/ away, or pass force=true to start over")
        state = checkpoint.get("state_dict", {})
        own = {k: v for k, v in self.state_dict().items() if k in self.trainable_names()}
        missing = sorted(set(own) - set(state))
        mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                            for k, v in own.items() if k in state and state[k].shape != v.shape)
        if missing or mismatched:
            listed = "\n  ".join(mismatched[:20] + [f"missing: {k}" for k in missing[:20]])
            raise CheckpointError(f"checkpoint does not match this model:\n  {listed}\n"
                                  "It was written by a different configuration; move it away to start over.")
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.eval_history = [tuple(e) for e in checkpoint.get("eval_history", [])]
        self.epoch_seconds = list(checkpoint.get("epoch_seconds", []))
        self.train_images = checkpoint.get("train_images", 0)
