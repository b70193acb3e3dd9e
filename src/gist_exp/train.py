"""Entry point. One run:   python -m gist_exp.train peft=adapter task=dtd
A sweep:                  python -m gist_exp.train -m 'task=glob(*)' peft=adapter,lora,vpt gist=on,off seed=0,1,2

Every run writes <run dir>/results.json (atomically), resumes from <run dir>/checkpoints/last.ckpt
when it was interrupted, and is skipped when results.json already holds a completed run of the same
resolved config (force=true retrains).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from . import sweep
from .checkpoint import AtomicCheckpointIO
from .data import Task, VTabDataModule, get_task
from .data.tasks import UnknownTaskError, canonical_task_name
from .errors import ConfigError, GistExpError
from .models import build_model, count_parameters
from .models.vit import free_cublas_workspaces
from .module import GistModule, LossWeights, Schedule
from .results import base_record, read_results, write_results

log = logging.getLogger("gist_exp")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*is validated against ConfigStore schema.*")
# Printed once under compile=true's CUDA graph capture (models/vit.py: capture_tokens); the step was measured as fast
# as under torch's own CUDA graphs (benchmarks/RESULTS.md).
warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


# ---- command line -------------------------------------------------------------------------------
def resolve_task_aliases(argv: list[str]) -> list[str]:
    """`task=cifar100,pets` -> `task=cifar,oxford_iiit_pet`; unknown names fail here with the valid ones."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"(task)=([\w,\s]+)", arg)
        if match:
            names = [canonical_task_name(n) for n in match.group(2).split(",") if n.strip()]
            arg = f"task={','.join(names)}"
        out.append(arg)
    return out


def main() -> None:
    try:
        argv = resolve_task_aliases(sys.argv[1:])
    except UnknownTaskError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    hydra_main()
    if sweep.failed_jobs:
        sys.exit(1)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    record = run(cfg, Path(hydra_cfg.runtime.output_dir), in_sweep)
    if in_sweep:
        sweep.report_job(record, hydra_cfg.sweep.dir)
    elif record["status"] == "failed":
        sys.exit(1)


# ---- one run ------------------------------------------------------------------------------------
def resolve(cfg: DictConfig) -> dict:
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"the configuration does not resolve: {e}") from None
    config.pop("hydra", None)
    return config


# The fields that say which job a record is, kept even when the config does not resolve.
IDENTITY = {"task": "task.name", "peft": "peft.name", "gist": "gist.enabled", "seed": "seed", "protocol": "protocol"}


def _select(cfg: DictConfig, path: str):
    try:
        return OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return None


def run(cfg: DictConfig, output_dir: Path, in_sweep: bool = False, callbacks: list | None = None) -> dict:
    """Train and test one configuration; return its results.json record.

    Bad input (config, data tree, weights) is found by `prepare`, before anything is written: a single
    run then only prints the error; a sweep job also records it as failed, for the summary and the table.
    `callbacks`: extra Lightning callbacks (tools such as the benchmark use this)."""
    start = time.perf_counter()
    try:
        config = resolve(cfg)
        record = base_record(config, output_dir)
    except (GistExpError, KeyError) as e:
        record = {"status": "failed", "error": str(e), "output_dir": str(output_dir),
                  **{key: _select(cfg, path) for key, path in IDENTITY.items()},
                  "config": OmegaConf.to_container(cfg, resolve=False)}
        return _refused(record, e, output_dir, in_sweep)

    previous = read_results(output_dir)
    if previous and previous.get("status") == "completed" and not cfg.force \
            and previous.get("config_hash") == record["config_hash"]:
        log.info("already completed (%s): %s; force=true retrains", output_dir / "results.json", _headline(previous))
        return {**previous, "skipped": True}

    prepare_start = time.perf_counter()
    try:
        job = prepare(cfg, config)
        record["prepare_s"] = round(time.perf_counter() - prepare_start, 2)  # checks, data validation, model
    except GistExpError as e:
        record.update(status="failed", error=str(e), error_type=type(e).__name__)
        return _refused(record, e, output_dir, in_sweep)

    if previous and previous.get("status") == "completed":  # another configuration's result: keep it beside
        kept = output_dir / f"results.{previous.get('config_hash')}.json"
        os.replace(output_dir / "results.json", kept)
        log.warning("results.json of a different configuration moved to %s", kept)
    job.module.config_hash = record["config_hash"]  # a checkpoint of another configuration is refused
    try:
        record.update(execute(job, cfg, config, output_dir, in_sweep, callbacks or []))
        record["status"] = "completed"
    except GistExpError as e:
        record.update(status="failed", error=str(e), error_type=type(e).__name__)
        log.error("error: %s", e)
    except torch.cuda.OutOfMemoryError as e:
        record.update(status="failed", error_type="OutOfMemoryError",
                      error=f"out of GPU memory ({str(e).splitlines()[0]}); lower data.batch_size or "
                            f"data.eval_batch_size, or run one job per GPU")
        log.error("error: %s", record["error"])
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}", error_type=type(e).__name__,
                      traceback=traceback.format_exc())
        log.exception("run failed")
    finally:
        close_loggers(job.loggers)
        model = weakref.ref(job.module.model)
        del job
        release_gpu_memory(model)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    path = write_results(output_dir, record)
    if record["status"] == "completed":
        log.info("%s -> %s", _headline(record), path)
    return record


def _refused(record: dict, error: Exception, output_dir: Path, in_sweep: bool) -> dict:
    log.error("error: %s", error)
    if in_sweep:
        write_results(output_dir, record)
    return record


def _headline(record: dict) -> str:
    metrics = record.get("metrics", {})
    acc = metrics.get("test_acc", metrics.get("val_acc"))
    params = record.get("params", {}).get("trainable_excl_head")
    return (f"{record['task']} {sweep.method_name(record)} seed={record['seed']}: "
            f"{record.get('eval_split', 'test')} acc {acc:.2f}% (last epoch), {params:,} trainable "
            f"parameters excluding the head")


def check_config(cfg: DictConfig, max_epochs: int) -> None:
    """Settings that are valid one by one but not together, or out of range: refused before any work."""
    def positive_int(key: str, value) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer")

    positive_int("trainer.max_epochs", max_epochs)
    positive_int("data.batch_size", cfg.data.batch_size)
    positive_int("data.eval_batch_size", cfg.data.eval_batch_size)
    if cfg.trainer.devices != 1:
        raise ConfigError(f"trainer.devices={cfg.trainer.devices}: one device per job (DDP pads the VTAB test "
                          "set and these tasks are small); spread a sweep over GPUs with hydra/launcher=ray")
    if cfg.protocol not in ("final", "tune"):
        raise ConfigError(f"protocol={cfg.protocol!r} is not one of final, tune")
    every = cfg.eval.every_n_epochs
    if not isinstance(every, int) or every < 0 or every > max_epochs:
        raise ConfigError(f"eval.every_n_epochs={every!r} must be 0 (test at the end only) or between 1 and "
                          f"trainer.max_epochs={max_epochs}")
    every = cfg.checkpoint.every_n_epochs
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ConfigError(f"checkpoint.every_n_epochs={every!r} must be 0 (a checkpoint at the end only) or a "
                          "positive integer")
    if not (isinstance(cfg.recipe.lr, (int, float)) and cfg.recipe.lr > 0):
        raise ConfigError(f"recipe.lr={cfg.recipe.lr!r} must be a positive number")
    if cfg.recipe.warmup_epochs >= cfg.recipe.epochs:
        raise ConfigError(f"recipe.warmup_epochs={cfg.recipe.warmup_epochs} must be below recipe.epochs="
                          f"{cfg.recipe.epochs}")
    if not (isinstance(cfg.recipe.drop_path, (int, float)) and 0 <= cfg.recipe.drop_path < 1):
        raise ConfigError(f"recipe.drop_path={cfg.recipe.drop_path!r} must be a number in [0, 1)")
    if cfg.peft.name == "vpt" and not (isinstance(cfg.peft.num_prompts, int) and cfg.peft.num_prompts >= 1):
        raise ConfigError(f"peft.num_prompts={cfg.peft.num_prompts!r} must be a positive integer")
    size, patch = cfg.backbone.image_size, cfg.backbone.patch_size
    if size % patch:
        raise ConfigError(f"backbone.image_size={size} is not a multiple of backbone.patch_size={patch}")


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's mixed precisions


def precision(cfg: DictConfig) -> str:
    if cfg.trainer.precision != "auto":
        return str(cfg.trainer.precision)
    return "bf16-mixed" if build_device(cfg).type == "cuda" else "32-true"


def build_device(cfg: DictConfig) -> torch.device:
    """Where the model is built: the device Lightning will train on (one GPU per job)."""
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_loggers(cfg: DictConfig, config: dict, output_dir: Path, task: str):
    if cfg.logger.name == "none":
        return []
    # a new logs/version_N/ per attempt: a resumed run keeps the metrics of the attempts before it
    loggers = [CSVLogger(save_dir=output_dir, name="logs")]
    if cfg.logger.name == "wandb":
        gist = "on" if cfg.gist.enabled else "off"
        loggers.append(WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
            name=f"{task}-{cfg.peft.name}-gist_{gist}-seed{cfg.seed}", save_dir=str(output_dir),
            tags=[f"task:{task}", f"peft:{cfg.peft.name}", f"gist:{gist}", f"seed:{cfg.seed}"],
            config=config, mode=cfg.logger.mode))
    return loggers


def close_loggers(loggers) -> None:
    """Finish each W&B run, so nothing of this job bleeds into the next job of the same process."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


@dataclass
class Job:
    """Everything one run needs, built and checked before anything is written."""

    task: Task
    datamodule: VTabDataModule
    module: GistModule
    params: dict
    max_epochs: int
    loggers: list = field(default_factory=list)


def release_gpu_memory(model: weakref.ref) -> None:
    """After a job, with the job dropped: collect its objects and give its GPU memory back, so that the next job
    of a sweep in this process starts from the same memory. cuBLAS's workspaces go too (compile=true leaves one
    per job), but only once the job's model is gone: its CUDA graphs, which still use theirs, go with it."""
    gc.collect()
    if torch.cuda.is_available():
        if model() is None:
            free_cublas_workspaces()
        torch.cuda.empty_cache()


def prepare(cfg: DictConfig, config: dict) -> Job:
    """Check the config and the data tree, build the model (loading its weights): no file is written."""
    task = get_task(cfg.task.name)
    recipe = cfg.recipe
    schedule = Schedule(recipe.epochs, recipe.warmup_epochs, recipe.cooldown_epochs, recipe.warmup_lr, recipe.min_lr)
    max_epochs = cfg.trainer.max_epochs or schedule.length
    check_config(cfg, max_epochs)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul, as the reference timings
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = VTabDataModule(
        root=cfg.data.root, task=task, protocol=cfg.protocol, image_size=cfg.backbone.image_size,
        pipeline=cfg.data.pipeline, cache_dir=cfg.data.cache_dir, batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size, num_workers=min(cfg.data.num_workers, os.cpu_count() or 1),
        drop_last=cfg.data.drop_last, seed=cfg.seed, list_all_errors=cfg.data.list_all_errors)
    datamodule.validate()

    gist = config["gist"]
    with torch.device(build_device(cfg)):  # initialising 86M parameters on the CPU takes seconds
        model = build_model(config["backbone"], config["peft"], gist, task.num_classes, recipe.drop_path,
                            cfg.data.normalization)
    if autocast_dtype := AUTOCAST_DTYPES.get(precision(cfg)):
        model.store_frozen_weights_in(autocast_dtype)
    params = count_parameters(model)
    log.info("trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in params.items()))
    loss = LossWeights(gist["ce_weight"], gist["kl_weight"], gist["temperature"]) if gist["enabled"] else None
    module = GistModule(model, recipe.lr, recipe.weight_decay, schedule, loss, compile=cfg.compile)
    return Job(task, datamodule, module, params, max_epochs)


def execute(job: Job, cfg: DictConfig, config: dict, output_dir: Path, in_sweep: bool, callbacks: list) -> dict:
    """Train (resuming from last.ckpt when there is one), test on the last weights, return the results fields."""
    job_start = time.perf_counter()
    module, datamodule, params = job.module, job.datamodule, job.params
    job.loggers = loggers = make_loggers(cfg, config, output_dir, job.task.name)
    for logger in loggers:
        logger.log_hyperparams({"params": params})
    checkpoints = output_dir / "checkpoints"
    every = cfg.eval.every_n_epochs
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=precision(cfg), max_epochs=job.max_epochs,
        logger=loggers or False, deterministic=cfg.trainer.deterministic,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.progress_bar and not in_sweep, enable_model_summary=False,
        check_val_every_n_epoch=every or 1, limit_val_batches=1.0 if every else 0, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, filename="last", save_top_k=1, monitor=None,
                                   every_n_epochs=cfg.checkpoint.every_n_epochs, save_on_train_epoch_end=True,
                                   enable_version_counter=False), *callbacks],
        plugins=[AtomicCheckpointIO()], default_root_dir=output_dir)
    last = checkpoints / "last.ckpt"
    if last.is_file() and cfg.force:  # retrain from scratch, keeping the old checkpoints beside
        kept = checkpoints.with_name(f"checkpoints.replaced-{int(time.time())}")
        os.replace(checkpoints, kept)
        log.info("force=true: previous checkpoints moved to %s", kept)
    elif last.is_file():
        log.info("resuming from %s", last)

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.is_file() else None, weights_only=True)
    checkpoint_every = cfg.checkpoint.every_n_epochs
    if not checkpoint_every or job.max_epochs % checkpoint_every:  # else the last epoch's was just written
        trainer.save_checkpoint(last)  # the final weights, whatever checkpoint.every_n_epochs; resumes into testing
    fit_s = time.perf_counter() - fit_start
    test_start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_s = time.perf_counter() - test_start

    key = "test_acc" if cfg.protocol == "final" else "val_acc"
    metrics = {key: round(module.test_acc, 4)}
    if module.eval_history:  # best epoch on the evaluation split: reported, never the headline
        best_epoch, best_acc = max(module.eval_history, key=lambda e: e[1])
        metrics.update({f"{key}_best": round(max(best_acc, module.test_acc), 4), f"{key}_best_epoch": best_epoch,
                        f"{key}_during_training": [[e, round(a, 4)] for e, a in module.eval_history]})
    for logger in loggers:
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if not isinstance(v, list)})
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({key: metrics[key], **params})
    return {
        "eval_split": datamodule.eval_split.split,
        "metrics": metrics,
        "params": params,
        "epochs": job.max_epochs,
        "train_images": module.train_images,
        "eval_images": len(datamodule.eval_split),
        "setup_s": round(fit_start - job_start, 2),  # loggers, trainer (after prepare_s)
        "fit_s": round(fit_s, 2),
        "test_s": round(test_s, 2),
        "train_images_per_s": round(module.train_images / sum(module.epoch_seconds), 1) if module.epoch_seconds else None,
        "epoch_s": [round(t, 3) for t in module.epoch_seconds],
        "eval_images_per_s": round(module.eval_images_per_s, 1) if module.eval_images_per_s else None,
        "precision": trainer.precision,
        "device": str(trainer.strategy.root_device),
    }


if __name__ == "__main__":
    main()
