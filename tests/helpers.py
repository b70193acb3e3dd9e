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


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (run-*.wandb): a LevelDB-style log after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        space = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if space < 7 or kind == 0:  # block trailer or padding
            pos += space
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full record
            chunks.append(chunk)
        elif kind == 2:  # first, middle, last fragments
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records
