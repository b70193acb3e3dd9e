"""results.json: the one file per run that sweeps, tables and later tools read."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .data.tasks import get_task
from .io import atomic_write_json, read_json

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1
# Keys that change where or how a run is logged, not what it computes: they do not enter the config hash.
NOT_HASHED = ("logger", "force", "sweep_name", "data.num_workers", "data.list_all_errors", "data.cache_dir",
              "trainer.progress_bar")


def config_hash(config: dict) -> str:
    config = json.loads(json.dumps(config, default=str))
    for dotted in NOT_HASHED:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("gist_exp", "torch", "torchvision", "timm", "pytorch-lightning", "hydra-core", "omegaconf",
                 "pillow", "numpy", "wandb"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions


def git_commit() -> dict[str, object]:
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=source, capture_output=True,
                              text=True, timeout=10)
        commit = head.stdout.strip() if head.returncode == 0 else None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def machine() -> dict[str, object]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu": gpu, "pid": os.getpid(), "platform": platform.platform()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def base_record(config: dict, output_dir: Path) -> dict:
    """The fields every results.json has, completed or failed."""
    task = get_task(config["task"]["name"])
    return {
        "schema": SCHEMA_VERSION,
        "status": None,
        "error": None,
        "task": task.name,
        "group": task.group,
        "peft": config["peft"]["name"],
        "gist": bool(config["gist"]["enabled"]),
        "seed": config["seed"],
        "protocol": config["protocol"],
        "backbone": {"name": config["backbone"]["name"], "weights": str(config["backbone"]["weights"])},
        "metrics": {},
        "params": {},
        "output_dir": str(output_dir),
        "started_at": now(),
        "started_unix": time.time(),
        "versions": package_versions(),
        "git": git_commit(),
        "machine": machine(),
        "argv": sys.argv,
        "config_hash": config_hash(config),
        "config": config,
    }


def write_results(output_dir: Path, record: dict) -> Path:
    record["finished_at"] = now()
    record["finished_unix"] = time.time()
    path = Path(output_dir) / RESULTS_FILE
    atomic_write_json(path, record)
    return path


def read_results(output_dir: Path) -> dict | None:
    return read_json(Path(output_dir) / RESULTS_FILE)


def find_results(paths) -> list[dict]:
    """Every results.json under the given files or directories."""
    found = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob(RESULTS_FILE))
        for file in files:
            record = read_json(file)
            if isinstance(record, dict) and "status" in record:
                record.setdefault("output_dir", str(file.parent))
                found.append(record)
    return found
