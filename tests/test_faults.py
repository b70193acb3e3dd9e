"""Faults with real files and processes: kills, torn writes, non-finite losses, bad input, concurrent sweeps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gist_exp.data import fake
from helpers import REPO, TINY, read_results, run_cli


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "vtab"
    fake.make_task(root, "dtd", train=1000, test=100)
    return root


def args(root, out, *extra):
    return [*TINY, f"data.root={root}", f"hydra.run.dir={out}", "peft=adapter", "trainer.max_epochs=12",
            "trainer.deterministic=true", "checkpoint.every_n_epochs=1", *extra]


def trainable_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


# CPU math that does not depend on load or memory alignment (MKL picks kernels by both): the
# deterministic settings under which a resumed run must equal an uninterrupted one bit for bit
DETERMINISTIC = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}


def start(argv):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **DETERMINISTIC}
    return subprocess.Popen([sys.executable, "-m", "gist_exp.train", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_checkpoint(argv, run_dir, epochs_done: int, extra_delay: float):
    """Start a run, SIGKILL it `extra_delay` s after its checkpoint of epoch `epochs_done` appears."""
    proc = start(argv)
    last, deadline = run_dir / "checkpoints" / "last.ckpt", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                if torch.load(last, weights_only=True)["epoch"] >= epochs_done - 1:
                    break
            except Exception:
                pass  # never torn (atomic), but it may have been replaced while we read it
        time.sleep(0.02)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_sigkill_mid_run_resumes_to_exactly_the_same_result(root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*args(root, run_dir), env=DETERMINISTIC).returncode == 0  # the same command, never interrupted
    expected, expected_state = read_results(run_dir), trainable_state(run_dir)
    shutil.rmtree(run_dir)

    kill_after_checkpoint(args(root, run_dir), run_dir, epochs_done=3, extra_delay=0.05)  # mid-epoch 4
    assert not (run_dir / "results.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] < 11
    kill_after_checkpoint(args(root, run_dir), run_dir, epochs_done=7, extra_delay=0.0)  # around a checkpoint write
    resumed = run_cli(*args(root, run_dir), env=DETERMINISTIC)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from" in resumed.stdout
    got = read_results(run_dir)
    assert got["metrics"] == expected["metrics"] and got["epochs"] == expected["epochs"] == 12
    assert got["train_images"] == expected["train_images"]
    state = trainable_state(run_dir)
    assert state.keys() == expected_state.keys() and all(torch.equal(state[k], expected_state[k]) for k in state)
    assert len(list(run_dir.glob("logs/version_*/metrics.csv"))) == 3  # every attempt kept its log


ATOMIC_WRITER = textwrap.dedent("""
    import sys
    from gist_exp.io import atomic_write_bytes
    for i in range(1000):
        atomic_write_bytes(sys.argv[1], bytes([i % 251]) * (200 * 2**20))
        print(i, flush=True)
""")


def test_a_write_killed_midway_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "results.json"
    proc = subprocess.Popen([sys.executable, "-c", ATOMIC_WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    proc.stdout.readline()  # the first file is complete
    time.sleep(0.15)  # somewhere inside a later write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = target.read_bytes()
    assert len(data) == 200 * 2**20 and data.count(data[:1]) == len(data)  # one whole version, never a mix


def test_corrupt_checkpoint_is_named_and_nothing_else_is_lost(root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*args(root, run_dir, "trainer.max_epochs=2")).returncode == 0
    (run_dir / "results.json").unlink()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = run_cli(*args(root, run_dir, "trainer.max_epochs=2"))
    assert proc.returncode == 1
    assert f"checkpoint '{ckpt}' cannot be read" in proc.stdout and "mv " in proc.stdout
    assert ckpt.stat().st_size == 1000  # left for the user to look at


def test_checkpoint_of_another_configuration_is_refused(root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*args(root, run_dir, "trainer.max_epochs=2")).returncode == 0
    (run_dir / "results.json").unlink()
    proc = run_cli(*args(root, run_dir, "trainer.max_epochs=3", "recipe.lr=0.001"))
    assert proc.returncode == 1 and "checkpoint was written by another configuration" in proc.stdout
    forced = run_cli(*args(root, run_dir, "trainer.max_epochs=3", "recipe.lr=0.001", "force=true"))
    assert forced.returncode == 0 and list(tmp_path.glob("run/checkpoints.replaced-*"))


def test_checkpoint_with_objects_is_refused(root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*args(root, run_dir, "trainer.max_epochs=1")).returncode == 0
    (run_dir / "results.json").unlink()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["payload"] = os.system  # an arbitrary object: only unpickled by an unsafe load
    torch.save(checkpoint, ckpt)
    proc = run_cli(*args(root, run_dir, "trainer.max_epochs=1"))
    assert proc.returncode == 1 and "cannot be read (UnpicklingError" in proc.stdout


def test_non_finite_loss_stops_records_the_step_and_keeps_earlier_results(root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*args(root, run_dir, "trainer.max_epochs=2")).returncode == 0
    earlier = read_results(run_dir)
    proc = run_cli(*args(root, run_dir, "trainer.max_epochs=2", "recipe.lr=1e30", "recipe.warmup_lr=1e30", "force=true"))
    assert proc.returncode == 1
    failed = read_results(run_dir)
    assert failed["status"] == "failed" and failed["error"].startswith("non-finite loss at optimizer step ")
    assert json.loads((run_dir / f"results.{earlier['config_hash']}.json").read_text()) == earlier


@pytest.mark.parametrize("override, message", [
    ("peft=foo", "Could not find 'peft/foo'"),
    ("trainer.devices=2", "trainer.devices=2: one device per job"),
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc' must be a positive integer"),
    ("eval.every_n_epochs=50", "eval.every_n_epochs=50 must be 0"),
    ("checkpoint.every_n_epochs=-1", "checkpoint.every_n_epochs=-1 must be 0 (a checkpoint at the end only)"),
    ("protocol=test", "protocol='test' is not one of final, tune"),
    ("recipe.drop_path=1.0", "recipe.drop_path=1.0 must be a number in [0, 1)"),
    ("data.pipeline=dali", "data.pipeline='dali' is not one of"),
    ("gist=off gist.head=separate", "Key 'head' is not in struct"),
    ("backbone.weights=/nonexistent/ViT-B_16.npz", "backbone.weights file '/nonexistent/ViT-B_16.npz' does not exist"),
    ("data.root=/nonexistent", "data.root '/nonexistent' is not a directory"),
])
def test_bad_settings_are_refused_before_anything_is_written(root, tmp_path, override, message):
    run_dir = tmp_path / "run"
    proc = run_cli(*args(root, run_dir), *override.split())
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-2000:]
    assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints").exists()
    if "Could not find" not in message and "struct" not in message:  # ours, not Hydra's: one message, no traceback
        assert "Traceback" not in proc.stdout


def test_sweep_job_with_non_finite_loss_fails_alone(root, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, f"data.root={root}", f"hydra.sweep.dir={out}", "peft=linear",
                   "trainer.max_epochs=2", "recipe.lr=0.005,1e30", "recipe.warmup_lr=${recipe.lr}")
    assert proc.returncode == 1
    results = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    assert sorted(r["status"] for r in results) == ["completed", "failed"]
    assert "1 completed, 0 skipped, 1 failed" in proc.stdout and "non-finite loss" in proc.stdout


def test_two_sweeps_into_one_tree_do_not_corrupt_each_other(root, tmp_path):
    out = tmp_path / "sweep"
    command = ["-m", *TINY, f"data.root={root}", f"hydra.sweep.dir={out}", "peft=linear,lora", "trainer.max_epochs=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "gist_exp.train", *command], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    assert len(results) == 2 and all(r["status"] == "completed" for r in results)
    for ckpt in out.rglob("last.ckpt"):
        assert torch.load(ckpt, weights_only=True)["epoch"] == 3  # written after the last of 3 epochs
    lines = [json.loads(l) for l in (out / "sweep_progress.jsonl").read_text().splitlines()]
    assert sum(l["event"] == "start" for l in lines) == 2 and sum(l["event"] == "job" for l in lines) == 4


def test_a_run_that_builds_the_cache_trains_exactly_like_one_that_finds_it(root, tmp_path):
    first = run_cli(*args(root, tmp_path / "a", "trainer.max_epochs=3"), env=DETERMINISTIC)  # builds the cache
    second = run_cli(*args(root, tmp_path / "b", "trainer.max_epochs=3"), env=DETERMINISTIC)  # reads it
    assert first.returncode == second.returncode == 0
    assert read_results(tmp_path / "a")["metrics"] == read_results(tmp_path / "b")["metrics"]
    a, b = trainable_state(tmp_path / "a"), trainable_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_gpu_memory_is_recorded_as_failed(root, tmp_path, make_cfg):
    """The OOM path on a CPU machine: a callback raises the real torch.cuda.OutOfMemoryError mid-training."""
    import pytorch_lightning as pl

    from gist_exp.train import run

    class OutOfMemory(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cfg = make_cfg(*TINY, f"data.root={root}", "peft=linear", "trainer.max_epochs=2", "logger=none")
    record = run(cfg, tmp_path / "run", in_sweep=True, callbacks=[OutOfMemory()])
    assert record["status"] == "failed" and record["error_type"] == "OutOfMemoryError"
    assert record["error"].startswith("out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB)")
    assert "lower data.batch_size" in record["error"]
    assert read_results(tmp_path / "run")["status"] == "failed"
