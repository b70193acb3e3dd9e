"""Sweep bookkeeping: one line per finished job, how many remain, and a closing summary of failures.

`<sweep dir>/sweep_progress.jsonl` is append-only: a sweep appends a start line with its job count,
each job appends one line when it ends (single small O_APPEND writes, safe from concurrent jobs,
launchers and sweeps), and the summary reads the lines after its own start line back. The entry
point exits non-zero when any job of the sweep failed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("gist_exp")

PROGRESS_FILE = "sweep_progress.jsonl"
failed_jobs: list[dict] = []  # filled at the end of a sweep, read by gist_exp.train.main


def count_jobs(config: DictConfig) -> int | None:
    """The number of jobs the basic sweeper will expand the overrides to (None if it cannot tell)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = config.hydra.sweeper.get("params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
        return sum(len(batch) for batch in batches)
    except Exception:
        return None


def method_name(record: dict) -> str:
    return f"{record.get('peft')}{'+gist' if record.get('gist') else ''}"


def report_job(record: dict, sweep_dir: str | Path) -> None:
    """Append this job's line and print it with the count of finished and remaining jobs."""
    sweep_dir = Path(sweep_dir)
    acc = record.get("metrics", {}).get("test_acc", record.get("metrics", {}).get("val_acc"))
    line = {
        "status": "skipped" if record.get("skipped") else record.get("status"),
        "task": record.get("task"),
        "method": method_name(record),
        "seed": record.get("seed"),
        "acc": acc,
        "wall_s": record.get("wall_s"),
        "output_dir": record.get("output_dir"),
        "error": (record.get("error") or "").splitlines()[0][:300] if record.get("error") else None,
    }
    append_line(sweep_dir, {"event": "job", **line})
    start, jobs = current_sweep(sweep_dir)
    done, total = len(jobs), start.get("total")
    count = f"{done}/{total} done, {total - done} left" if total else f"{done} done"
    outcome = {
        "completed": f"{acc:.2f}%" if acc is not None else "completed",
        "skipped": f"skipped, completed earlier ({acc:.2f}%)" if acc is not None else "skipped",
        "failed": f"FAILED: {line['error']}",
    }.get(line["status"], line["status"])
    seconds = f" in {line['wall_s']:.1f}s" if line["wall_s"] is not None and line["status"] != "skipped" else ""
    print(f"[sweep {count}] {line['task']} {line['method']} seed={line['seed']}: {outcome}{seconds}", flush=True)


def append_line(sweep_dir: Path, line: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep_dir / PROGRESS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def current_sweep(sweep_dir: Path, sweep_id: str | None = None) -> tuple[dict, list[dict]]:
    """The start line of sweep `sweep_id` (default: the latest one) and the job lines after it."""
    try:
        lines = [json.loads(l) for l in (Path(sweep_dir) / PROGRESS_FILE).read_text().splitlines() if l.strip()]
    except (OSError, ValueError):
        return {}, []
    starts = [i for i, l in enumerate(lines) if l.get("event") == "start" and (sweep_id in (None, l.get("id")))]
    first = starts[-1] if starts else -1
    return (lines[first] if starts else {}), [l for l in lines[first + 1:] if l.get("event") == "job"]


class SweepProgress(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_id = f"{os.getpid()}-{time.time_ns()}"
        append_line(Path(config.hydra.sweep.dir), {"event": "start", "id": self.sweep_id,
                                                    "total": count_jobs(config)})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _, lines = current_sweep(Path(config.hydra.sweep.dir), getattr(self, "sweep_id", None))
        by_status = {s: [l for l in lines if l["status"] == s] for s in ("completed", "skipped", "failed")}
        failed_jobs[:] = by_status["failed"]
        summary = ", ".join(f"{len(v)} {k}" for k, v in by_status.items())
        print(f"[sweep] finished: {summary} -> {config.hydra.sweep.dir}", flush=True)
        for job in failed_jobs:
            print(f"[sweep] FAILED {job['task']} {job['method']} seed={job['seed']}: {job['error']}\n"
                  f"        {job['output_dir']}/results.json", flush=True)
        if failed_jobs:
            print("[sweep] re-run the same command to retry only the failed and missing jobs", flush=True)
