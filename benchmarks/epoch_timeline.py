"""Where a training epoch's wall time goes in the real fast path (a GPU development tool).

    PYTHONPATH=src python benchmarks/epoch_timeline.py [--epochs 30] [--window 10:20] [--trace FILE]

Runs the bench's fast path (`gist_exp.train.run` on its synthetic dtd-sized task: ViT-B/16, adapter + GIST,
bf16-mixed, compile=true) and records CUDA events and host times at every batch and epoch hook of the
epochs in `--window`. At the window's first epoch start it waits for the GPU once, so that the event
recorded there runs at once and ties the GPU clock to the host clock. From that:
- "GPU step": GPU time between consecutive batch starts: the step's device time when the GPU never waits;
- "host step": host time between consecutive batch starts;
- "lag": how far the GPU trails the host at a batch start (0 means the GPU waited for the host);
- "to 1st step": GPU time from the epoch's start to its first batch (the GPU idles there if it waited);
- "to next": host time from the epoch's end hook to the next epoch's start (checkpoints, logging);
- one epoch's GPU step times and lags, step by step.
With `--trace`, one epoch (the window's first) is also profiled (CUDA activity only), and its GPU busy
and idle time and, per kernel name, the calls, time and idle time before them are printed per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile

from gist_exp import bench

TRAIN, TEST, SIZE = 1000, 1880, (500, 375)  # the bench's defaults: dtd-sized, JPEGs of 500x375


class Timeline(pl.Callback):
    def __init__(self, first: int, last: int, trace: Path | None):
        self.first, self.last, self.trace = first, last, trace
        self.marks: dict[int, list[tuple[str, float, torch.cuda.Event]]] = {}
        self.profiler = None
        self.anchor: tuple[float, torch.cuda.Event] | None = None  # (host time, event) with the GPU idle

    def _anchor(self) -> None:
        torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.anchor = (time.perf_counter(), event)

    def _mark(self, trainer, name: str) -> None:
        epoch = trainer.current_epoch
        if self.first <= epoch < self.last:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.setdefault(epoch, []).append((name, time.perf_counter(), event))

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.first:
            self._anchor()
            if self.trace:
                self.profiler = profile(activities=[ProfilerActivity.CUDA])  # no CPU events: the host stays as fast
                self.profiler.__enter__()
        self._mark(trainer, "epoch_start")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._mark(trainer, "batch_start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._mark(trainer, "batch_end")

    def on_train_epoch_end(self, trainer, module):
        self._mark(trainer, "epoch_end")
        if self.profiler is not None and trainer.current_epoch == self.first:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(str(self.trace))
            self.profiler = None


def summarise(marks: dict[int, list], epoch_s: list[float], anchor: tuple[float, torch.cuda.Event]) -> None:
    torch.cuda.synchronize()
    anchor_host, anchor_event = anchor
    print(f"{'epoch':>5} {'epoch s':>8} {'GPU step ms':>11} {'host step ms':>12} {'min lag ms':>10} "
          f"{'max lag ms':>10} {'to 1st step ms':>14} {'steps ms':>9} {'to next ms':>10}")
    gpu_steps, host_steps, detail = [], [], {}
    for epoch, rows in sorted(marks.items()):
        start_event = rows[0][2]
        starts = [(h, e) for name, h, e in rows if name == "batch_start"]
        end_host, end_event = rows[-1][1], rows[-1][2]
        gpu = [a[1].elapsed_time(b[1]) for a, b in zip(starts, starts[1:])]
        host = [(b[0] - a[0]) * 1e3 for a, b in zip(starts, starts[1:])]
        lags = [anchor_event.elapsed_time(e) - (h - anchor_host) * 1e3 for h, e in starts]
        gpu_steps += gpu
        host_steps += host
        detail[epoch] = (gpu, lags)
        first = start_event.elapsed_time(starts[0][1])
        steps = starts[0][1].elapsed_time(end_event)
        # host time from this epoch's end hook to the next one's start: the module's epoch end, checkpoints, logging
        following = marks.get(epoch + 1)
        to_next = f"{(following[0][1] - end_host) * 1e3:>10.2f}" if following else f"{'':>10}"
        print(f"{epoch:>5} {epoch_s[epoch]:>8.4f} {statistics.median(gpu):>11.2f} {statistics.median(host):>12.2f} "
              f"{min(lags):>10.2f} {max(lags):>10.2f} {first:>14.2f} {steps:>9.1f} {to_next}")
    print(f"median over the window: GPU step {statistics.median(gpu_steps):.2f} ms, host step "
          f"{statistics.median(host_steps):.2f} ms")
    epoch = sorted(detail)[len(detail) // 2]
    gpu, lags = detail[epoch]
    print(f"epoch {epoch}, step by step: GPU ms {' '.join(f'{t:.2f}' for t in gpu)}")
    print(f"epoch {epoch}, GPU lag behind the host at each batch start, ms: {' '.join(f'{t:.1f}' for t in lags)}")


def trace_gaps(path: Path, steps: int, top: int = 25) -> None:
    """GPU busy time and idle gaps of the profiled epoch, and per kernel name: calls, time and the idle
    time just before it, per step."""
    events = json.loads(path.read_text())["traceEvents"]
    device = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    if not device:
        print(f"{path}: no GPU activity in the trace")
        return
    busy, idle, end = 0.0, 0.0, device[0][0]
    names: dict[str, list[float]] = {}
    for begin, finish, name in device:
        gap = max(0.0, begin - end)
        idle += gap
        busy += max(0.0, finish - max(begin, end))
        end = max(end, finish)
        row = names.setdefault(name[:70], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += finish - begin
        row[2] += gap
    span = end - device[0][0]
    print(f"trace: {len(device)} GPU activities over {span / 1e3:.1f} ms ({steps} steps), busy {busy / 1e3:.1f} ms "
          f"({busy / span:.1%}), idle {idle / 1e3:.2f} ms")
    print(f"{'calls/step':>10} {'us/step':>9} {'idle before us/step':>19} name")
    for name, (calls, total, gap) in sorted(names.items(), key=lambda kv: -kv[1][1] - kv[1][2])[:top]:
        print(f"{calls / steps:>10.1f} {total / steps:>9.1f} {gap / steps:>19.1f} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--window", default="10:20", help="FIRST:LAST epochs to record (LAST excluded)")
    parser.add_argument("--trace", type=Path, default=None, help="profile the window's first epoch to this file")
    parser.add_argument("--root", type=Path, default=Path("/tmp/gist_exp_bench"))
    parser.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    first, last = (int(v) for v in args.window.split(":"))
    workers = max(1, (os.cpu_count() or 2) - 1)
    run_args = argparse.Namespace(backbone="vit_b16_augreg_in21k", epochs=args.epochs, compile=True, workers=workers,
                                  override=args.override)
    root = bench.bench_root(args.root, TRAIN, TEST, SIZE)  # the bench's own task: its cache is reused
    bench.synthetic_task(root, bench.BENCH_TASK, TRAIN, TEST, SIZE, workers)
    config = bench.compose(bench.overrides_for("fast", run_args, root, bench.BENCH_TASK))
    bench.build_cache(root, bench.BENCH_TASK, config.backbone.image_size, workers)
    timeline = Timeline(first, last, args.trace)
    record = bench.run(config, Path("/tmp/gist_exp_timeline") / time.strftime("%H%M%S"), callbacks=[timeline])
    if record["status"] != "completed":
        raise SystemExit(f"run failed: {record.get('error')}")
    result = bench.summarise("fast", record, TEST)
    print(f"bench numbers: train {result['train_img_s']:,.0f} img/s, median epoch {result['epoch_s']:.4f} s")
    outside = record["fit_s"] - sum(record["epoch_s"])
    print(f"fit {record['fit_s']:.2f} s, of which {outside:.2f} s outside the epochs' times "
          f"({outside / max(len(record['epoch_s']) - 1, 1) * 1e3:.1f} ms per epoch boundary, with the fit's start and end)")
    if timeline.anchor is None:
        raise SystemExit(f"--window {args.window} starts after the run's last epoch ({args.epochs - 1})")
    summarise(timeline.marks, record["epoch_s"], timeline.anchor)
    if args.trace:
        trace_gaps(args.trace, record["train_images"] // len(record["epoch_s"]) // config.data.batch_size)


if __name__ == "__main__":
    main()
