"""The adapter's Triton projection kernels (gist_exp.models.skinny).

The kernels run in Triton's CPU interpreter, which must be chosen before Triton is imported: the pytest
test runs this file as a script in a process of its own. `python tests/models/test_skinny.py cuda` runs
the same checks on a GPU (fp32 and bf16).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def linear_errors(device: str, dtype: torch.dtype) -> dict[str, float]:
    """skinny_linear against F.linear: outputs and every gradient, both skinny sides, with and without bias."""
    from gist_exp.models.skinny import skinny_linear

    errors = {}
    for n, k in ((4, 96), (96, 4), (5, 40)):  # down-like, up-like, odd sizes
        for bias in (True, False):
            torch.manual_seed(0)
            x = torch.randn(3, 37, k, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True) if bias else None
            seed = torch.randn(3, 37, n, device=device, dtype=dtype)
            inputs = (x, w, b) if bias else (x, w)
            results = []
            for fn in (torch.nn.functional.linear, skinny_linear):
                out = fn(x, w, b)
                results.append((out, *torch.autograd.grad((out * seed).sum(), inputs)))
            for name, ref, got in zip(("out", "x", "w", "b"), *results):
                errors[f"w {n}x{k}{' + b' if bias else ''}: {name}"] = relative(got, ref)
    return errors


def adapter_errors(device: str) -> dict[str, float]:
    """The adapter's kernel path against its nn.Linear path (fp32): output and every gradient."""
    from gist_exp.models.adapter import Adapter

    torch.manual_seed(0)
    adapter = Adapter(64, 4, 0.1, torch.nn.GELU, "trunc_normal").to(device)
    torch.nn.init.normal_(adapter.down.bias)
    torch.nn.init.normal_(adapter.up.bias)
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    results = []
    for forward in (lambda: adapter.up(adapter.act(adapter.down(x))) * adapter.scale,
                    lambda: adapter.forward_kernels(x, torch.float32)):
        out = forward()
        results.append((out, *torch.autograd.grad(out.square().sum(), (x, *adapter.parameters()))))
    names = ("out", "x", *(n for n, _ in adapter.named_parameters()))
    return {f"adapter: {name}": relative(got, ref) for name, ref, got in zip(names, *results)}


def main(device: str) -> None:
    checks = [(torch.float32, 1e-5, {**linear_errors(device, torch.float32), **adapter_errors(device)})]
    if device == "cuda":  # both sides round their outputs to bf16
        checks.append((torch.bfloat16, 2e-2, linear_errors(device, torch.bfloat16)))
    failed = False
    for dtype, tolerance, errors in checks:
        worst = max(errors, key=errors.get)
        print(f"{dtype}: largest relative difference {errors[worst]:.2e} ({worst})")
        for name, error in errors.items():
            if error > tolerance:
                print(f"  FAILED {name}: {error:.2e} > {tolerance:g}")
                failed = True
    if failed:
        raise SystemExit(1)
    print("skinny kernels match F.linear")


@needs_triton
def test_kernels_compute_linear_and_the_adapter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root / "src")}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skinny kernels match F.linear" in done.stdout


@needs_triton
def test_a_weight_without_a_skinny_side_is_refused():
    from gist_exp.models.skinny import skinny_linear

    with pytest.raises(ValueError, match=r"weight \(32, 64\) has no side <= 15"):
        skinny_linear(torch.randn(3, 64), torch.randn(32, 64))


def test_kernels_only_where_they_apply():
    from gist_exp.models.adapter import Adapter, skinny_linear
    from tiny import tiny

    has_triton = skinny_linear is not None
    assert Adapter(64, 4, 0.1, torch.nn.GELU, "trunc_normal").kernels == has_triton
    assert not Adapter(64, 32, 0.1, torch.nn.GELU, "trunc_normal").kernels  # wider than the kernels take
    off = tiny(dict(name="adapter", variant="shared_parallel", kernels=False))
    assert not any(block.adapter.kernels for block in off.vit.blocks)
    on = tiny(dict(name="adapter", variant="shared_parallel"))
    assert all(block.adapter.kernels == has_triton for block in on.vit.blocks)


def test_on_the_cpu_the_adapter_runs_its_linear_layers():
    from gist_exp.models.adapter import Adapter

    torch.manual_seed(0)
    adapter = Adapter(64, 4, 0.1, torch.nn.GELU, "trunc_normal")
    x = torch.randn(2, 9, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
        expected = adapter.up(adapter.act(adapter.down(x))) * adapter.scale
    assert torch.equal(out, expected)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
