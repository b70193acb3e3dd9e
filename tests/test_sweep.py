"""Sweeps: the multirun grid, resuming, failure isolation, the Ray launcher and W&B offline logging."""

import json

import pytest

from gist_exp.data import fake
from gist_exp.table import main as table_main
from helpers import TINY, run_cli, wandb_records

TASKS3 = ("dtd", "eurosat", "clevr_count")


@pytest.fixture
def sweep_root(tmp_path):
    root = tmp_path / "vtab"
    for task in TASKS3:
        fake.make_task(root, task, train=128, test=32)
    return root


def sweep(root, sweep_dir, *overrides, **kwargs):
    return run_cli("-m", *TINY, f"data.root={root}", f"hydra.sweep.dir={sweep_dir}", "trainer.max_epochs=2",
                   *overrides, **kwargs)


def all_results(sweep_dir):
    return {path.parent: json.loads(path.read_text()) for path in sweep_dir.rglob("results.json")}


def test_grid_rerun_skips_and_table(sweep_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ("task=dtd,eurosat,clevr_count", "peft=adapter,lora,vpt", "gist=on,off")
    proc = sweep(sweep_root, out, *grid)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = all_results(out)
    assert len(results) == 18 and all(r["status"] == "completed" for r in results.values())
    assert (out / "vpt-gist_on" / "clevr_count" / "seed=0").is_dir()  # readable, collision-free directories
    assert "[sweep 1/18 done, 17 left]" in proc.stdout and "[sweep 18/18 done, 0 left]" in proc.stdout
    assert "18 completed, 0 skipped, 0 failed" in proc.stdout

    again = sweep(sweep_root, out, *grid)
    assert again.returncode == 0 and "0 completed, 18 skipped, 0 failed" in again.stdout
    assert all_results(out) == results  # nothing was retrained or rewritten

    assert table_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Mean (3 groups)" in printed and "Mean (19 tasks)" in printed and printed.count("| Δ GIST") == 3
    for name in ("table.md", "table.csv", "table.tex", "gist_gains.png"):
        assert (out / name).is_file()


def test_failed_job_is_recorded_and_the_rest_goes_on(sweep_root, tmp_path):
    listing = sweep_root / "eurosat" / "test.txt"
    good = listing.read_text()
    listing.write_text(good.replace(" 3\n", " 10\n", 1))  # a label outside [0, 10)
    out = tmp_path / "sweep"
    proc = sweep(sweep_root, out, "task=dtd,eurosat,clevr_count", "peft=linear")
    assert proc.returncode == 1, proc.stdout[-3000:]
    results = {r["task"]: r for r in all_results(out).values()}
    assert results["dtd"]["status"] == results["clevr_count"]["status"] == "completed"
    assert results["eurosat"]["status"] == "failed" and "label 10 is outside [0, 10)" in results["eurosat"]["error"]
    assert "2 completed, 0 skipped, 1 failed" in proc.stdout and "[sweep] FAILED eurosat linear+gist" in proc.stdout

    listing.write_text(good)
    retry = sweep(sweep_root, out, "task=dtd,eurosat,clevr_count", "peft=linear")
    assert retry.returncode == 0 and "1 completed, 2 skipped, 0 failed" in retry.stdout
    assert {r["task"]: r for r in all_results(out).values()}["dtd"] == results["dtd"]  # not retrained


def test_ray_launcher_gives_each_job_one_gpu_and_runs_two_at_a_time(sweep_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    out = tmp_path / "sweep"
    proc = sweep(sweep_root, out, "task=dtd,eurosat", "peft=linear", "gist=on,off", "hydra/launcher=ray",
                 "+hydra.launcher.ray.init.num_gpus=2", "+hydra.launcher.ray.init.num_cpus=2",
                 "+hydra.launcher.ray.init.include_dashboard=false", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    jobs = list(all_results(out).values())
    assert len(jobs) == 4 and all(r["status"] == "completed" for r in jobs)
    assert sorted(r["machine"]["cuda_visible_devices"] for r in jobs) == ["0", "0", "1", "1"]
    assert len({r["machine"]["pid"] for r in jobs}) == 4  # every job in its own process
    events = sorted([(r["started_unix"], 1) for r in jobs] + [(r["finished_unix"], -1) for r in jobs])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most <= 2
    for gpu in ("0", "1"):  # jobs that shared a GPU id never overlapped
        spans = sorted((r["started_unix"], r["finished_unix"]) for r in jobs if r["machine"]["cuda_visible_devices"] == gpu)
        assert spans[0][1] <= spans[1][0]


def test_wandb_offline_run_holds_the_test_accuracy(sweep_root, tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(sweep_root, out, "task=dtd,eurosat", "peft=linear", "gist=on", "logger=wandb", "sweep_name=wb")
    assert proc.returncode == 0, proc.stdout[-3000:]
    for run_dir, result in all_results(out).items():
        [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        records = wandb_records(run_file)
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_group == "wb" and f"task:{result['task']}" in run.tags and "gist:on" in run.tags
        assert len([r for r in records if r.WhichOneof("record_type") == "exit"]) == 1  # finished, no bleed
        summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                   for i in r.summary.update if i.key}
        assert summary["test_acc"] == result["metrics"]["test_acc"]
        assert summary["trainable_excl_head"] == result["params"]["trainable_excl_head"]
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["task"]["name"] == result["task"] and config["recipe"]["lr"] == {"dtd": 5e-3, "eurosat": 3e-3}[result["task"]]  # resolved per task
        assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()  # the CSV log sits beside it


def test_launcher_configs_compose_and_extras_have_no_conflicts(tmp_path):
    proc = run_cli("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", "-p",
                   "hydra.launcher")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "gpus_per_node: 1" in proc.stdout and "partition: gpu" in proc.stdout and "SlurmLauncher" in proc.stdout
    ray = run_cli("hydra/launcher=ray", "--cfg", "hydra", "-p", "hydra.launcher")
    assert "num_gpus: 1" in ray.stdout and "max_calls: 1" in ray.stdout
    import subprocess
    import sys
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # the [ray] and [slurm] extras install without conflicts
