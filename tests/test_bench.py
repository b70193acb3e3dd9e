"""The benchmark's CPU smoke run (the H200 numbers come from the device; see benchmarks/RESULTS.md)."""

import importlib.util
import py_compile
import subprocess
import sys
import types
import time

import pytest
import torch

from gist_exp.bench import compile_cache_state, has_bytecode, inductor_counters, warm_note
from helpers import REPO


def test_bench_smoke_times_both_paths_and_appends_a_row(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    proc = subprocess.run([sys.executable, "-m", "gist_exp.bench", "--smoke", "--workers", "2", "--root",
                           str(tmp_path / "data"), "--results", str(results), "--json", str(tmp_path / "b.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "fast       32-true" in out and "reference  32-true" in out
    assert "end-to-end task time, reference / fast:" in out and "projected 19-task sweep" in out
    text = results.read_text()
    assert text.startswith("# Benchmark results") and text.count("| vit_tiny_test | 3 | 200/100 |") == 1
    import json
    numbers = json.loads((tmp_path / "b.json").read_text())
    assert numbers["results"]["fast"]["train_images"] == 3 * (200 // 64) * 64
    assert numbers["results"]["fast-next"]["train_images"] == numbers["results"]["fast"]["train_images"]
    projection = numbers["projection"]  # the first task compiles, the 18 others reuse its graphs
    assert len(projection["per_task_s"]) == 19
    assert projection["total_s"] == pytest.approx(
        sum(projection["per_task_s"].values()) + projection["first_overhead_s"] - projection["overhead_s"])
    assert "as the next task in the same process" in out


def test_the_first_task_is_labelled_cold_or_warm_from_inductors_cache_counters():
    size = 1000 + time.time_ns() // 1000 % 1_000_000  # a shape no earlier run compiled: the first compile misses

    def compile_once():
        torch._dynamo.reset()  # drop the in-memory graphs, as a new process starts without them
        before = inductor_counters()
        torch.compile(lambda x: x.sin() * 2 + 1, dynamic=False)(torch.randn(size))
        return compile_cache_state(before, inductor_counters())

    assert compile_once() == "cold"
    assert compile_once() == "warm"
    assert compile_cache_state(inductor_counters(), inductor_counters()) == "no compile"
    assert warm_note({"compile_cache": "warm"}) == " (warm compile cache)" and warm_note({"compile_cache": "cold"}) == ""


def test_the_bench_reports_whether_python_has_compiled_bytecode_for_a_module(tmp_path):
    source = tmp_path / "plain.py"
    source.write_text("x = 1\n")
    module = types.SimpleNamespace(__file__=str(source))
    assert not has_bytecode(module)
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)))
    assert has_bytecode(module)
