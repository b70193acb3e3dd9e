"""`python -m gist_exp.train` as users run it: a subprocess on demo data, results.json as the contract."""

import json
import weakref

import pytest
import torch

import gist_exp.train as entry
from gist_exp.train import prepare, resolve, resolve_task_aliases
from helpers import TINY, read_results, run_cli


def train(root, out, *overrides):
    return run_cli(*TINY, f"data.root={root}", f"hydra.run.dir={out}", *overrides)


@pytest.mark.parametrize("gist", ["on", "off"])
@pytest.mark.parametrize("peft", ["adapter", "lora", "vpt"])
def test_every_method_trains_well_above_chance(demo_root, tmp_path, peft, gist):
    out = tmp_path / "run"
    proc = train(demo_root, out, f"peft={peft}", f"gist={gist}", "task=dtd", "trainer.max_epochs=10")
    assert proc.returncode == 0, proc.stdout[-3000:]
    check_completed_run(read_results(out), peft, gist)
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "logs" / "version_0" / "metrics.csv").is_file()
    assert "test acc" in proc.stdout


def test_baselines_train_well_above_chance(demo_root, tmp_path):
    """linear and full, gist on and off: four jobs of one multirun process (the same job function)."""
    proc = run_cli("-m", *TINY, f"data.root={demo_root}", f"hydra.sweep.dir={tmp_path}", "peft=linear,full",
                   "gist=on,off", "task=dtd", "trainer.max_epochs=10")
    assert proc.returncode == 0, proc.stdout[-3000:]
    for peft in ("linear", "full"):
        for gist in ("on", "off"):
            [path] = (tmp_path / f"{peft}-gist_{gist}" / "dtd" / "seed=0").rglob("results.json")
            check_completed_run(read_results(path.parent), peft, gist)


@pytest.mark.parametrize("precision, frozen", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16),
                                               ("32-true", torch.float32)])
def test_mixed_precision_jobs_keep_the_frozen_matmul_weights_in_the_autocast_dtype(make_cfg, small_root, precision,
                                                                                     frozen):
    cfg = make_cfg(*TINY, f"data.root={small_root}", "peft=adapter", f"trainer.precision={precision}")
    model = prepare(cfg, resolve(cfg)).module.model
    block = model.vit.blocks[0]
    assert block.block.attn.qkv.weight.dtype == block.block.mlp.fc2.bias.dtype == frozen
    assert model.vit.patch_embed.proj.weight.dtype == frozen
    assert block.adapter.down.weight.dtype == model.vit.head.weight.dtype == torch.float32  # trainable


def check_completed_run(r: dict, peft: str, gist: str) -> None:
    assert r["status"] == "completed" and r["error"] is None
    assert (r["task"], r["group"], r["peft"], r["gist"], r["seed"], r["protocol"]) == (
        "dtd", "Natural", peft, gist == "on", 0, "final")
    assert r["metrics"]["test_acc"] > 20.0  # dtd has 47 classes: chance is 2.1%
    assert "test_acc_best" not in r["metrics"]  # test was evaluated once
    assert r["params"]["gist"] == (64 if gist == "on" else 0)
    assert r["params"]["trainable_total"] == r["params"]["trainable_excl_head"] + 64 * 47 + 47
    assert r["backbone"] == {"name": "vit_tiny_patch16_224", "weights": "random"}
    assert r["epochs"] == 10 and r["wall_s"] > 0 and r["train_images_per_s"] > 0
    assert r["versions"]["torch"] and r["versions"]["timm"] and "commit" in r["git"]
    assert r["config"]["peft"]["name"] == peft and r["config"]["trainer"]["max_epochs"] == 10
    assert r["train_images"] == 10 * (1000 // 64) * 64 and r["eval_images"] == 200


def test_rerun_of_a_completed_run_trains_nothing(demo_root, tmp_path):
    out = tmp_path / "run"
    assert train(demo_root, out, "peft=linear", "trainer.max_epochs=2").returncode == 0
    first = read_results(out)
    again = train(demo_root, out, "peft=linear", "trainer.max_epochs=2")
    assert again.returncode == 0 and "already completed" in again.stdout and "Epoch" not in again.stdout
    assert read_results(out) == first
    forced = train(demo_root, out, "peft=linear", "trainer.max_epochs=2", "force=true")
    assert forced.returncode == 0 and read_results(out)["finished_at"] >= first["finished_at"]


def test_best_epoch_is_a_separate_metric_and_tune_protocol_reports_val(demo_root, tmp_path):
    proc = train(demo_root, tmp_path / "a", "peft=linear", "trainer.max_epochs=4", "eval.every_n_epochs=2")
    assert proc.returncode == 0, proc.stdout[-2000:]
    metrics = read_results(tmp_path / "a")["metrics"]
    assert [e for e, _ in metrics["test_acc_during_training"]] == [1, 3]
    assert metrics["test_acc_best"] >= metrics["test_acc"] and "test_acc_best_epoch" in metrics
    proc = train(demo_root, tmp_path / "b", "peft=linear", "trainer.max_epochs=2", "protocol=tune")
    r = read_results(tmp_path / "b")
    assert proc.returncode == 0 and r["eval_split"] == "val200" and "val_acc" in r["metrics"]
    assert "test_acc" not in r["metrics"] and r["eval_images"] == 200


def test_task_aliases_and_unknown_task(tmp_path):
    assert resolve_task_aliases(["task=cifar100,pets", "peft=lora", "task=glob(*)"]) == [
        "task=cifar,oxford_iiit_pet", "peft=lora", "task=glob(*)"]
    proc = run_cli("task=imagenet", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "unknown task 'imagenet'" in proc.stdout and "oxford_iiit_pet (oxford_pet, pets, pet)" in proc.stdout
    assert not (tmp_path / "results.json").exists()


def test_alias_runs_the_canonical_task(tmp_path):
    from gist_exp.data import fake
    fake.make_task(tmp_path / "vtab", "oxford_iiit_pet", train=64, test=16)
    proc = train(tmp_path / "vtab", tmp_path / "run", "task=pets", "peft=linear", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert read_results(tmp_path / "run")["task"] == "oxford_iiit_pet"


def test_default_run_dir_names_method_task_seed_and_extra_overrides(demo_root, tmp_path):
    proc = run_cli(*TINY, f"data.root={demo_root}", "peft=linear", "gist=off", "seed=3", "trainer.max_epochs=1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    run_dir = tmp_path / "outputs/runs/linear-gist_off/dtd/seed=3"
    [results] = list(run_dir.rglob("results.json"))
    assert results.parent.name == "backbone=vit_tiny_test,trainer.max_epochs=1,trainer.progress_bar=false"
    assert json.loads(results.read_text())["seed"] == 3


def test_the_last_checkpoint_holds_the_final_weights_and_a_rerun_from_it_only_tests(demo_root, tmp_path):
    out = tmp_path / "run"
    assert train(demo_root, out, "peft=linear", "trainer.max_epochs=3").returncode == 0  # < checkpoint.every_n_epochs
    first = read_results(out)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3  # after the last epoch
    (out / "results.json").unlink()
    proc = train(demo_root, out, "peft=linear", "trainer.max_epochs=3")
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stdout[-3000:]
    again = read_results(out)
    assert again["metrics"] == first["metrics"]
    assert again["epoch_s"] == first["epoch_s"] and again["train_images"] == first["train_images"]  # nothing retrained


def test_after_a_job_cublas_workspaces_are_freed_only_once_its_model_is_gone(monkeypatch):
    """compile=true captures its CUDA graphs on a new stream per job, and cuBLAS keeps a workspace per stream
    (0.064 GiB per job on an H200). A sweep frees them after each job, but never while the job's model, and so
    its graphs, can still run."""
    freed = []
    monkeypatch.setattr(entry, "free_cublas_workspaces", lambda: freed.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = torch.nn.Linear(2, 2)
    alive = weakref.ref(model)
    entry.release_gpu_memory(alive)
    assert freed == []
    del model
    entry.release_gpu_memory(alive)
    assert freed == [True]
