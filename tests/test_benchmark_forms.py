"""The rewritten adapters and blocks in benchmarks/ compute the module's maths (float64, CPU), so the
step times RESULTS.md reports for them compare like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import adapter_forms  # noqa: E402
import block_forms  # noqa: E402


@pytest.mark.parametrize("check", [adapter_forms.check, block_forms.check], ids=["adapter_forms", "block_forms"])
def test_forms_match_the_module(check, capsys):
    check()  # raises SystemExit when a form differs by more than 1e-10
    assert "max |difference|" in capsys.readouterr().out
