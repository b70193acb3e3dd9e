"""Throughput benchmark: the fast path against the reference-style path, side by side in one run.

    python -m gist_exp.bench                      # on a GPU: ViT-B/16, 1,000 train + 1,880 test JPEGs, 100 epochs
    python -m gist_exp.bench --smoke              # on a CPU: the tiny ViT, a few epochs (what CI runs)

Both paths are the real entry point (`gist_exp.train.run`) on the same synthetic task made of real
JPEG files on disk, adapter + GIST, random weights, batch 64:
- fast: decode-once cache (built before timing starts), training set on the device, bf16-mixed,
  fused AdamW, torch.compile, one evaluation at the end in batches of 512;
- reference: PIL decoding in DataLoader workers every epoch, fp32 (TF32 matmuls), eager.
It prints train and test images/s, epoch time, end-to-end task time, the ratio, MFU against a bf16
matmul rate measured in the same run, the projected 19-task sweep time, and appends a row to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose as hydra_compose, initialize_config_dir
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from .data import TASKS, fake, get_task
from .data.cache import cached_split
from .data.vtab import load_protocol
from .io import atomic_write_bytes
from .models import build_model
from .train import CONF_DIR, resolve, run

REPO = Path(__file__).resolve().parents[2]
BENCH_TASK = "dtd"  # 47 classes; the synthetic tree gets its own sizes


# ---- measurements ---------------------------------------------------------------------------
def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float | None:
    """Median dense bf16 matmul rate on random data (the MFU denominator)."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def flops_per_image(cfg) -> tuple[float, float]:
    """(forward, training step) FLOPs per image of this exact model, counted by PyTorch's FlopCounterMode."""
    config = resolve(cfg)
    model = build_model(config["backbone"], config["peft"], config["gist"], get_task(BENCH_TASK).num_classes)
    size = cfg.backbone.image_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    counts = []
    for train in (False, True):
        counter = FlopCounterMode(display=False)
        with counter:
            cls_logits, gist_logits = model(images)
            if train:
                (cls_logits.float().sum() + gist_logits.float().sum()).backward()
        counts.append(counter.get_total_flops() / len(images))
    return counts[0], counts[1]


def compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def path_overrides(path: str, args) -> list[str]:
    if path == "fast":
        return ["data.pipeline=cached", "trainer.precision=auto", f"compile={str(args.compile).lower()}",
                f"data.num_workers={args.workers}"]
    return ["data.pipeline=pil", "trainer.precision=32-true", "compile=false", f"data.num_workers={args.workers}"]


def overrides_for(path: str, args, root: Path, task: str) -> list[str]:
    return [
        f"task={task}", "peft=adapter", "gist=on", f"backbone={args.backbone}", "backbone.weights=random",
        f"data.root={root}", f"data.cache_dir={root / '_cache'}", f"trainer.max_epochs={args.epochs}",
        "logger=none", "trainer.progress_bar=false", "force=true", f"checkpoint.every_n_epochs={args.epochs}",
        *path_overrides(path, args), *args.override,
    ]


def run_path(path: str, args, root: Path, out: Path, test_size: int, task: str = BENCH_TASK,
             callbacks: list | None = None) -> dict:
    run_dir = out / f"{path}-{task}-{time.strftime('%H%M%S')}-{time.perf_counter_ns()}"
    record = run(compose(overrides_for(path, args, root, task)), run_dir, callbacks=callbacks)
    return summarise(path, record, test_size)


def cli_run(args, root: Path, out: Path) -> dict:
    """The fast path as a user runs it: `python -m gist_exp.train ...` in a new process, timed from the
    outside (imports and compilation included; torch.compile's on-disk caches are warm by now)."""
    run_dir = out / f"cli-{time.perf_counter_ns()}"
    command = [sys.executable, "-m", "gist_exp.train", *overrides_for("fast", args, root, BENCH_TASK),
               f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process_s = time.perf_counter() - start
    result = summarise("fast-cli", json.loads((run_dir / "results.json").read_text()), args.test)
    return {**result, "process_s": process_s}


def summarise(path: str, record: dict, test_size: int) -> dict:
    if record["status"] != "completed":
        raise SystemExit(f"{path} path failed: {record.get('error')}\n{record.get('traceback', '')}")
    epochs = record["epoch_s"]
    steady = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    images_per_epoch = record["train_images"] / len(epochs)
    return {
        "path": path,
        "precision": record["precision"],
        "train_img_s": images_per_epoch / steady,  # steady state: median epoch after the first
        "train_img_s_overall": record["train_images_per_s"],  # every epoch, compilation included
        "first_epoch_s": epochs[0],
        "epoch_s": steady,
        "test_img_s": record["eval_images_per_s"] or test_size / record["test_s"],  # after the first batch
        "test_img_s_overall": test_size / record["test_s"],  # the whole test phase
        "fit_s": record["fit_s"],
        "test_s": record["test_s"],
        "task_s": record["wall_s"],  # end to end: checks, model build, fit (compile included), test
        "setup_s": record["prepare_s"] + record["setup_s"],  # config and data checks, model build, trainer
        "test_acc": record["metrics"]["test_acc"],
        "train_images": record["train_images"],
    }


def inductor_counters() -> dict[str, int]:
    """Inductor's running counts, among them its FX-graph cache hits and misses."""
    return dict(counters["inductor"])


def compile_cache_state(before: dict[str, int], after: dict[str, int]) -> str:
    """How a run found torch.compile's on-disk cache, from inductor's counters before and after it."""
    hits, misses = (after.get(k, 0) - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss"))
    if hits == misses == 0:
        return "no compile"
    return "cold" if hits == 0 else "warm" if misses == 0 else "partly warm"


def bench_root(base: Path, train: int, test: int, size: tuple[int, int]) -> Path:
    """Where the bench's synthetic task of these sizes lives under `base` (tools that reuse it look here)."""
    return base / f"{train}-{test}-{size[0]}x{size[1]}"


def synthetic_task(root: Path, task: str, train: int, test: int, size: tuple[int, int], workers: int) -> None:
    """Write a synthetic task's JPEG tree under `root`, unless an earlier run did."""
    if not (root / task / "test.txt").is_file():
        print(f"writing the synthetic task {task} ({train} train, {test} test JPEGs of {size[0]}x{size[1]}) to {root}")
        fake.make_task(root, task, train, test, size, workers=workers)


def build_cache(root: Path, task: str, image_size: int, workers: int) -> None:
    """Decode once, before timing: the targets are for runs once the cache exists."""
    for split in load_protocol(root, get_task(task), "final"):
        cached_split(split, root / "_cache", image_size, workers)


def task_seconds(fast: dict, overhead_s: float, train_images: int, test_images: int) -> float:
    """The projection model: per-task overhead + training images / rate + test images / rate."""
    return overhead_s + train_images / fast["train_img_s"] + test_images / fast["test_img_s"]


def overhead_s(run: dict, test_size: int) -> float:
    """What the steady rates leave out of a task: model build, data checks, compilation, first batches."""
    return run["task_s"] - task_seconds(run, 0.0, run["train_images"], test_size)


def project_sweep(first: dict, later: dict | None, bench_test_size: int, epochs_per_task: int, train_size: int,
                  batch: int) -> dict:
    """19 tasks of one method, one after another in one process (the basic launcher), from the measured
    rates and SPEC test sizes. The first task pays the compilation (`first`, with the on-disk compile
    cache as the bench found it); the others reuse its compiled graphs (`later`: a second task in the
    same process)."""
    train_images = epochs_per_task * (train_size // batch) * batch  # training drops the last batch
    first_s = overhead_s(first, bench_test_size)
    later_s = overhead_s(later, bench_test_size) if later else first_s
    per_task = {t.name: task_seconds(first, later_s, train_images, t.test_size) for t in TASKS.values()}
    return {"per_task_s": per_task, "total_s": sum(per_task.values()) + first_s - later_s,
            "first_overhead_s": first_s, "overhead_s": later_s, "train_images_per_task": train_images}


SYNC_WARNING = "called a synchronizing CUDA operation"  # PyTorch's warning for each synchronising call


class SyncDebug(pl.Callback):
    """CUDA sync debugging on inside every training batch and between epochs (from an epoch's end hooks,
    the module's and the checkpoint's, to the next epoch's first batch), counting the two apart in the
    warnings recorded into `caught`. The last epoch's end is left out: the final checkpoint is written there.
    PyTorch's sync debugging does not see waits on CUDA events (the module's, on epochs long finished)."""

    def __init__(self, caught: list):
        self.caught = caught
        self.between_epochs = 0
        self._boundary_from: int | None = None  # index into caught where the current boundary began

    def on_train_batch_start(self, *args):
        if self._boundary_from is not None:
            self.between_epochs += sum(SYNC_WARNING in str(w.message) for w in self.caught[self._boundary_from:])
            self._boundary_from = None
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, *args):
        torch.cuda.set_sync_debug_mode(0)

    def on_train_epoch_end(self, trainer, module):  # runs before the module's and the checkpoint's hooks
        if trainer.current_epoch < trainer.max_epochs - 1:
            self._boundary_from = len(self.caught)
            torch.cuda.set_sync_debug_mode("warn")


def check_sync(args, root: Path, out: Path, batch_size: int) -> tuple[float, int]:
    """Train the fast path (eager) for 3 epochs with every host synchronisation inside a training step
    (forward, loss, backward, optimizer) or between epochs turned into a warning; return the count per
    step and the count between epochs."""
    short = argparse.Namespace(**{**vars(args), "epochs": 3, "compile": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        debug = SyncDebug(caught)
        record = run_path("fast", short, root, out / "sync", args.test, callbacks=[debug])
    torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]  # not its one-off "prototype feature" notice
    in_steps = len(syncs) - debug.between_epochs
    steps = record["train_images"] // batch_size
    print(f"sync check: {in_steps} host synchronisations inside {steps} training steps "
          f"({in_steps / steps:.2f} per step), {debug.between_epochs} between epochs ({short.epochs - 1} boundaries)")
    for w in syncs[:5]:
        print(f"  {w.filename}:{w.lineno}: {str(w.message)[:100]}")
    return in_steps / steps, debug.between_epochs


def check_projection(args, root_base: Path, out: Path, fast: dict, overhead: float, spec: str,
                     image_size: int) -> dict:
    """Run several synthetic tasks one after another in this process (as a sweep with the basic launcher
    does) and compare their measured total with the projection from the single-task rates and the
    per-task `overhead` of a later task."""
    tasks = [(name, int(size)) for name, size in (item.split(":") for item in spec.split(","))]
    width, height = fake.parse_size(args.image_size)
    measured, projected = 0.0, 0.0
    for name, test_size in tasks:
        root = root_base / f"projection-{args.train}-{width}x{height}"
        synthetic_task(root, name, args.train, test_size, (width, height), args.workers)
        build_cache(root, name, image_size, args.workers)
        record = run_path("fast", args, root, out / "projection", test_size, task=name)
        measured += record["task_s"]
        projected += task_seconds(fast, overhead, record["train_images"], test_size)
        print(f"projection check: {name} ({get_task(name).num_classes} classes, {test_size} test): "
              f"measured {record['task_s']:.1f}s")
    print(f"projection check: {len(tasks)} tasks measured {measured:.1f}s, projected {projected:.1f}s "
          f"({measured / projected:.2f}x)")
    return {"tasks": tasks, "measured_s": measured, "projected_s": projected}


# ---- reporting ------------------------------------------------------------------------------
def has_bytecode(module) -> bool:
    """Whether Python finds compiled bytecode (a .pyc) for this module's source. pip writes them at install;
    without them (PYTHONDONTWRITEBYTECODE set on an install without .pyc) every process compiles the
    sources again, adding seconds to the imports and to a first compile."""
    return Path(importlib.util.cache_from_source(module.__file__)).exists()


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "host": platform.node(), "gpu": gpu,
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": version("timm"), "lightning": version("pytorch-lightning"),
            "torch_bytecode": has_bytecode(torch)}


def warm_note(run: dict | None) -> str:
    """The note after a row's first-task time when that task found a warm compile cache; none when
    it compiled cold or did not compile."""
    state = run.get("compile_cache", "cold") if run else "cold"
    return "" if state in ("cold", "no compile") else f" ({state} compile cache)"


def append_results(path: Path, info: dict, args, results: dict, ratio: float, mfu: float | None,
                   projection: dict | None) -> None:
    fast, ref, later = results.get("fast"), results.get("reference"), results.get("fast-next")
    header = ("| date | machine | GPU | versions | model | epochs | train/test imgs | fast train img/s | "
              "fast test img/s | fast task s | fast task s, next task | ref train img/s | ref test img/s | ref task s | "
              "end-to-end ratio | MFU (fast) | 19-task sweep (proj.) |\n|" + "---|" * 17 + "\n")
    def num(x, fmt="{:,.0f}"):
        return fmt.format(x) if x is not None else "-"
    row = (f"| {info['date']} | {info['host']} ({info['cpus']} CPUs) | {info['gpu']} | torch {info['torch']}, "
           f"timm {info['timm']}, PL {info['lightning']} | {args.backbone} | {args.epochs} | "
           f"{args.train}/{args.test} | {num(fast and fast['train_img_s'])} | {num(fast and fast['test_img_s'])} | "
           f"{num(fast and fast['task_s'], '{:.1f}')}{warm_note(fast)} | {num(later and later['task_s'], '{:.1f}')} | "
           f"{num(ref and ref['train_img_s'])} | "
           f"{num(ref and ref['test_img_s'])} | {num(ref and ref['task_s'], '{:.1f}')} | "
           f"{num(ratio, '{:.2f}x')} | {num(mfu, '{:.1%}')} | "
           f"{num(projection and projection['total_s'] / 60, '{:.1f} min')} |\n")
    text = path.read_text() if path.exists() else ""
    marker = "<!-- bench rows -->\n"
    if marker not in text:
        text += f"\n## Benchmark rows (appended by `python -m gist_exp.bench`)\n\n{marker}{header}"
    atomic_write_bytes(path, (text + row).encode())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny ViT, small task, 3 epochs")
    parser.add_argument("--backbone", default=None, help="backbone config (default vit_b16_augreg_in21k)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per path (default 100)")
    parser.add_argument("--train", type=int, default=None, help="training images (default 1000)")
    parser.add_argument("--test", type=int, default=None, help="test images (default 1880, dtd's size)")
    parser.add_argument("--image-size", default="500x375", help="JPEG size on disk, WxH (default 500x375)")
    parser.add_argument("--paths", default="fast,reference", help="which paths to time (default both)")
    parser.add_argument("--fast-runs", type=int, default=2, choices=[1, 2],
                        help="2 (default): time the fast path again as the next task of a sweep in this process")
    parser.add_argument("--cli-run", action="store_true",
                        help="also time the fast path as `python -m gist_exp.train` in a new process")
    parser.add_argument("--check-sync", action="store_true",
                        help="first train 3 epochs with CUDA sync debugging on and report host synchronisations")
    parser.add_argument("--check-projection", default=None, metavar="TASK:TEST,...",
                        help="after timing, run these synthetic tasks in sequence and compare with the projection, "
                             "e.g. eurosat:5400,kitti:711,clevr_count:3000")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile on the fast path (default: on with a GPU)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="DataLoader workers (default: CPUs - 1)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/gist_exp_bench"), help="where the synthetic task lives")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="do not append to the results file")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for both paths")
    args = parser.parse_args(argv)
    defaults = dict(backbone="vit_tiny_test", epochs=3, train=200, test=100) if args.smoke else \
        dict(backbone="vit_b16_augreg_in21k", epochs=100, train=1000, test=1880)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile is None:
        args.compile = torch.cuda.is_available()

    info = machine()
    size = fake.parse_size(args.image_size)
    root = bench_root(args.root, args.train, args.test, size)
    synthetic_task(root, BENCH_TASK, args.train, args.test, size, args.workers)
    cfg_fast = compose([f"backbone={args.backbone}", "backbone.weights=random", f"task={BENCH_TASK}", "peft=adapter"])

    start = time.perf_counter()
    build_cache(root, BENCH_TASK, cfg_fast.backbone.image_size, args.workers)
    cache_s = time.perf_counter() - start

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tflops = matmul_tflops(device)
    forward_flops, step_flops = flops_per_image(cfg_fast)
    out = Path("/tmp/gist_exp_bench_runs")
    batch_size = cfg_fast.data.batch_size
    sync_per_step, sync_between_epochs = (check_sync(args, root, out, batch_size)
                                          if args.check_sync and device.type == "cuda" else (None, None))
    results = {}
    for path in args.paths.split(","):
        before = inductor_counters()
        results[path] = run_path(path, args, root, out, args.test)
        results[path]["compile_cache"] = compile_cache_state(before, inductor_counters())
        if path == "fast" and args.fast_runs > 1:  # the next task of a sweep: compiled graphs exist
            results["fast-next"] = run_path("fast", args, root, out, args.test)
            results["fast-next"]["path"] = "fast-next"

    cli = cli_run(args, root, out) if args.cli_run and "fast" in results else None
    fast, ref = results.get("fast"), results.get("reference")
    ratio = ref["task_s"] / fast["task_s"] if fast and ref else None
    mfu = fast["train_img_s"] * step_flops / (tflops * 1e12) if fast and tflops else None
    projection = project_sweep(fast, results.get("fast-next"), args.test, args.epochs, args.train,
                               batch_size) if fast else None
    projection_check = check_projection(args, args.root, out, fast, projection["overhead_s"], args.check_projection,
                                        cfg_fast.backbone.image_size) if fast and args.check_projection else None

    print(f"\nmachine: {info}")
    if not info["torch_bytecode"]:
        print("note: Python has no compiled bytecode for torch here, so every process compiles its sources again "
              "(imports and a first compile take seconds longer than on a usual install); "
              "`python -m compileall -q -j 0 <site-packages>` writes it")
    print(f"cache build (decode once, {args.train + args.test} JPEGs, {args.workers} workers): {cache_s:.1f}s")
    print(f"model FLOPs per image: forward {forward_flops / 1e9:.1f} G, train step {step_flops / 1e9:.1f} G"
          + (f"; bf16 matmul measured {tflops:.0f} TFLOP/s" if tflops else ""))
    print(f"{'path':<10} {'precision':<11} {'train img/s':>11} {'first ep s':>10} {'epoch s':>8} "
          f"{'test img/s':>10} {'task s':>7} {'acc %':>6}")
    for r in results.values():
        print(f"{r['path']:<10} {r['precision']:<11} {r['train_img_s']:>11,.0f} {r['first_epoch_s']:>10.2f} "
              f"{r['epoch_s']:>8.3f} {r['test_img_s']:>10,.0f} {r['task_s']:>7.1f} {r['test_acc']:>6.1f}")
    if "fast-next" in results:
        print(f"fast path end to end: {fast['task_s']:.1f}s as the first task (compile cache: "
              f"{fast['compile_cache']}), "
              f"{results['fast-next']['task_s']:.1f}s as the next task in the same process")
    if cli:
        cache = "compile caches warm from the runs above" if args.compile else "no compile"
        print(f"fast path as a new `python -m gist_exp.train` process ({cache}): {cli['process_s']:.1f}s "
              f"(in the job: setup {cli['setup_s']:.1f}s, first epoch {cli['first_epoch_s']:.1f}s, "
              f"train {cli['train_img_s']:,.0f} img/s, test {cli['test_img_s']:,.0f} img/s, job {cli['task_s']:.1f}s)")
    if ratio:
        print(f"end-to-end task time, reference / fast: {ratio:.2f}x "
              f"(train steady state {fast['train_img_s'] / ref['train_img_s']:.2f}x)")
        if "fast-next" in results:
            print(f"end-to-end task time, reference / fast as the next task: "
                  f"{ref['task_s'] / results['fast-next']['task_s']:.2f}x")
    if mfu is not None:
        print(f"MFU of the fast train step: {mfu:.1%} of the measured bf16 matmul rate")
    if projection:
        print(f"projected 19-task sweep of one method ({args.epochs} epochs, SPEC test sizes): "
              f"{projection['total_s'] / 60:.1f} min (overhead: first task {projection['first_overhead_s']:.1f}s "
              f"with the compile cache {fast['compile_cache']}, "
              f"each later task {projection['overhead_s']:.1f}s)")
    numbers = dict(cli=cli, sync_per_step=sync_per_step, sync_between_epochs=sync_between_epochs,
                   projection_check=projection_check,
                   machine=info, args={k: str(v) for k, v in vars(args).items()}, cache_s=cache_s, tflops=tflops,
                   forward_flops=forward_flops, step_flops=step_flops, results=results, ratio=ratio, mfu=mfu,
                   projection=projection)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(numbers, indent=1).encode())
    if not args.no_append:
        append_results(args.results, info, args, results, ratio, mfu, projection)
        print(f"appended a row to {args.results}")


if __name__ == "__main__":
    main()
