import csv
import gc
import math
import weakref

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from timm.scheduler import CosineLRScheduler
from torch._dynamo.utils import counters

from gist_exp.data.datamodule import VTabDataModule
from gist_exp.data.tasks import TASKS
from gist_exp.errors import NonFiniteLossError
from gist_exp.module import GistModule, LossWeights, Schedule
from models.tiny import GIST_ON, tiny


def test_schedule_is_timms_cosine_with_warmup_and_cooldown():
    base = 5e-3
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    timm_schedule = CosineLRScheduler(optimizer, t_initial=100, lr_min=1e-8, warmup_t=10, warmup_lr_init=1e-7)
    ours = Schedule(epochs=100, warmup_epochs=10, cooldown_epochs=10, warmup_lr=1e-7, min_lr=1e-8)
    assert ours.length == 110
    for epoch in range(110):
        timm_schedule.step(epoch)
        assert ours.lr(epoch, base) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15), epoch
    assert ours.lr(0, base) == 1e-7 and ours.lr(105, base) == 1e-8
    # a shorter run gets the same curve compressed: epoch 5 of 11 is epoch 50 of 110
    assert ours.lr(5, base, max_epochs=11) == ours.lr(50, base)


def fit(root, tmp_path, peft, epochs=2):
    torch.manual_seed(0)
    model = tiny(peft, GIST_ON, num_classes=47)
    module = GistModule(model, lr=1e-2, weight_decay=0.05, schedule=Schedule(4, 1, 0), loss=LossWeights())
    dm = VTabDataModule(root, TASKS["dtd"], image_size=32, cache_dir=tmp_path / "cache", batch_size=8, num_workers=0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=False)
    return module, dm, trainer


@pytest.mark.parametrize("peft", [dict(name="adapter", variant="shared_parallel"),
                                  dict(name="lora", rank=8, alpha=8, targets=["qkv"]),
                                  dict(name="vpt", num_prompts=3, mode="deep", dropout=0.1)])
def test_training_changes_trainable_weights_only(small_root, tmp_path, peft):
    module, dm, trainer = fit(small_root, tmp_path, peft)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=dm)
    for name, param in module.model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    assert module.train_images == 2 * 40 // 8 * 8


def test_weight_decay_groups_and_checkpoint_holds_trainable_only(small_root, tmp_path):
    module, dm, trainer = fit(small_root, tmp_path, dict(name="adapter", variant="shared_parallel"), epochs=1)
    trainer.fit(module, datamodule=dm)
    decay, no_decay = trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"gist.token", "vit.head.weight"}
    assert all(p.ndim <= 1 for p in no_decay["params"])
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)["state_dict"]
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and len(saved) < len(module.state_dict()) / 3


def test_evaluation_leaves_cudnn_attention_out_and_training_keeps_torchs_choice(small_root, tmp_path):
    """On a GPU evaluation runs flash attention (a new process's first cuDNN call at a new batch size costs up to
    a second); training keeps cuDNN, which is faster per step there."""
    module, dm, trainer = fit(small_root, tmp_path, dict(name="adapter", variant="shared_parallel"), epochs=1)
    seen = []  # (autograd on, cuDNN allowed, flash allowed) at each call of the first block's attention
    module.model.vit.blocks[0].block.attn.register_forward_pre_hook(lambda attn, args: seen.append(
        (torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())))
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    training, evaluation = [s[1:] for s in seen if s[0]], [s[1:] for s in seen if not s[0]]
    assert len(training) == 40 // 8 and len(evaluation) == math.ceil(20 / dm.eval_batch_size)
    assert set(training) == {(True, True)} and set(evaluation) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after evaluation


def test_compile_keeps_checkpoint_keys_outputs_and_gradients_and_tasks_share_graphs_and_eval_stays_eager():
    torch.manual_seed(0)
    eager = tiny(dict(name="adapter", variant="shared_parallel"), GIST_ON, num_classes=47).eval()
    compiled = tiny(dict(name="adapter", variant="shared_parallel"), GIST_ON, num_classes=47).eval()
    compiled.load_state_dict(eager.state_dict())
    module = GistModule(compiled, lr=1e-2, weight_decay=0.05, schedule=Schedule(4, 1, 0), compile=True)
    assert list(module.model.state_dict()) == list(eager.state_dict())  # checkpoint keys unchanged
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    grads = []
    for model in (eager, compiled):
        cls_logits, gist_logits = model(images)
        (cls_logits.square().sum() + gist_logits.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        grads[-1]["logits"] = cls_logits.detach()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the next task of a sweep (another class count and drop-path rate) reuses the training graph
    cls_logits, gist_logits = compiled.train()(images)
    (cls_logits.sum() + gist_logits.sum()).backward()
    graphs = counters["stats"]["unique_graphs"]
    other = tiny(dict(name="adapter", variant="shared_parallel"), GIST_ON, num_classes=10, drop_path_rate=0.2)
    GistModule(other, lr=1e-2, weight_decay=0.05, schedule=Schedule(4, 1, 0), compile=True)
    cls_logits, gist_logits = other(images)
    (cls_logits.sum() + gist_logits.sum()).backward()
    assert counters["stats"]["unique_graphs"] == graphs > 0
    # evaluation (autograd off) runs the eager pipeline: no inference graph, the eager model's logits
    with torch.inference_mode():
        assert torch.equal(compiled.eval().predict(images[:3]), eager.eval().predict(images[:3]))
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_model_is_freed_as_soon_as_its_job_drops_it():
    """A sweep runs its jobs in one process: nothing compiled may keep a finished job's model alive."""
    model = tiny(dict(name="adapter", variant="shared_parallel"), GIST_ON, num_classes=7)
    module = GistModule(model, lr=1e-2, weight_decay=0.05, schedule=Schedule(4, 1, 0), compile=True)
    cls_logits, gist_logits = model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    (cls_logits.sum() + gist_logits.sum()).backward()
    freed = weakref.ref(model)
    gc.disable()  # no cyclic collection: only reference counting may free it
    try:
        del model, module, cls_logits, gist_logits
        assert freed() is None
    finally:
        gc.enable()


class PoisonHeadAt(pl.Callback):
    """Makes every loss of epoch `epoch` onwards non-finite."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                module.model.vit.head.bias.fill_(float("nan"))


@pytest.mark.parametrize("checkpoint_every, bad_epoch", [(1, 1), (None, 1), (None, 2)])  # 2: the last epoch
def test_a_non_finite_loss_stops_the_run_before_its_epoch_is_checkpointed_or_counted(small_root, tmp_path,
                                                                                      checkpoint_every, bad_epoch):
    """The host reads an epoch's non-finite check one epoch late (no wait at the epoch's end), but a checkpoint
    of that epoch is never written and the run never ends as if it were healthy."""
    module, dm, _ = fit(small_root, tmp_path, dict(name="adapter", variant="shared_parallel"), epochs=3)
    callbacks = [PoisonHeadAt(bad_epoch)]
    if checkpoint_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                      every_n_epochs=checkpoint_every, save_on_train_epoch_end=True))
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=bool(checkpoint_every), callbacks=callbacks)
    steps_per_epoch = 40 // 8
    with pytest.raises(NonFiniteLossError, match=rf"at optimizer step {bad_epoch * steps_per_epoch} \(epoch {bad_epoch}\)"):
        trainer.fit(module, datamodule=dm)
    assert len(module.epoch_seconds) == bad_epoch and module.train_images == bad_epoch * steps_per_epoch * 8
    if checkpoint_every:  # epoch 0's checkpoint is the last one written
        saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
        assert saved["epoch"] == 0 and len(saved["epoch_seconds"]) == 1
        assert torch.isfinite(saved["state_dict"]["model.vit.head.bias"]).all()


class SaveMidEpoch(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_written_mid_epoch_is_refused_after_a_non_finite_loss(small_root, tmp_path):
    module, dm, _ = fit(small_root, tmp_path, dict(name="adapter", variant="shared_parallel"), epochs=3)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=False, callbacks=[PoisonHeadAt(1), SaveMidEpoch(tmp_path / "mid.ckpt")])
    with pytest.raises(NonFiniteLossError, match=r"at optimizer step 5 \(epoch 1\)"):
        trainer.fit(module, datamodule=dm)
    assert not (tmp_path / "mid.ckpt").exists()


def test_every_epoch_is_timed_counted_and_logged_once_training_ends(small_root, tmp_path):
    module, dm, _ = fit(small_root, tmp_path, dict(name="adapter", variant="shared_parallel"), epochs=3)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert len(module.epoch_seconds) == 3 and all(t > 0 for t in module.epoch_seconds)
    assert module.train_images == 3 * 40 // 8 * 8
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss"]]
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(0, 4), (1, 9), (2, 14)]  # each epoch's last step
    assert [float(r["train/lr"]) for r in rows] == [module.schedule.lr(e, module.lr, 3) for e in range(3)]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
