"""Helpers for tests: the CLI as a subprocess and results.json reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["backbone=vit_tiny_test", "data.num_workers=0", "trainer.progress_bar=false"]


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m gist_exp.train ARGS` in a fresh process; stdout and stderr merged."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gist_exp.train", *args], cwd=cwd, env=environment,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())
