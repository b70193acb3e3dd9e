"""The rewritten adapters and blocks in benchmarks/ compute the module's maths (float64, CPU), so the
step times RESULTS.md reports for them compare like with like."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import adapter_forms  # noqa: E402
import block_forms  # noqa: E402


@pytest.mark.parametrize("check", [adapter_forms.check, block_forms.check], ids=["adapter_forms", "block_forms"])
def test_forms_match_the_module(check, capsys):
    check()  # raises SystemExit when a form differs by more than 1e-10
    assert "max |difference|" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_junction_kernels_match_the_blocks():
    """fused_junctions.py's Triton kernels in Triton's CPU interpreter (which must be chosen before Triton is
    imported, hence a process of its own): outputs and gradients of two adapter blocks, drop-path on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_junctions.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "largest difference relative to the largest value" in done.stdout
