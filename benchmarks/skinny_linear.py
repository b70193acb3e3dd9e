"""The adapter's projection kernels (`gist_exp.models.skinny`) timed against cuBLAS, for a few tile shapes
(a GPU development tool; numbers go to benchmarks/RESULTS.md).

    PYTHONPATH=src python benchmarks/skinny_linear.py
    PYTHONPATH=src python tests/models/test_skinny.py cuda    # their checks, on a GPU

Shapes are a ViT-B/16 batch of 64 with the Gist token: M = 64 x 198 rows, C = 768, r = 4. Each candidate
runs 20 times inside one CUDA graph (benchmarks/thin_gemm.py), median of 20 replays per call.
"""

from __future__ import annotations

import torch

from gist_exp.models import skinny


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def kernel_times(rows: int = 64 * 198, dim: int = 768, rank: int = 4) -> None:
    from thin_gemm import time_call

    bf = dict(device="cuda", dtype=torch.bfloat16)
    act, g_act = torch.randn(rows, dim, **bf), torch.randn(rows, dim, **bf)
    small = torch.randn(rows, rank, **bf)
    small_ones = torch.cat([small, torch.ones(rows, 1, **bf)], 1)
    w_down, w_up, b_dim = torch.randn(rank, dim, **bf), torch.randn(dim, rank, **bf), torch.randn(dim, **bf)
    empty = act.new_empty(0)
    mb = act.numel() * 2 / 1e6
    print(f"one ({rows}, {dim}) bf16 activation: {mb:.1f} MB; GB/s counts that tensor only")

    def show(name, fn, ref=None):
        us = time_call(fn)
        err = f"  rel err {relative(fn(), ref()):.2e}" if ref is not None else ""
        print(f"{name:<58} {us:>7.1f} us {mb * 1e3 / us:>7.0f} GB/s{err}", flush=True)

    def tiles(names, values):
        for name, value in zip(names, values):
            setattr(skinny, name, value)

    defaults = {name: getattr(skinny, name) for name in dir(skinny) if name.split("_")[0] in ("THIN", "OUTER", "WGRAD")}
    show("cuBLAS thin (M,C)@(C,r)", lambda: torch.nn.functional.linear(act, w_down))
    for shape in ((64, 128, 4), (32, 128, 2), (64, 256, 4), (128, 128, 8)):
        tiles(("THIN_ROWS", "THIN_COLS", "THIN_WARPS"), shape)
        show(f"thin  rows {shape[0]} cols {shape[1]} warps {shape[2]}", lambda: skinny.thin(act, w_down, empty),
             lambda: torch.nn.functional.linear(act, w_down))
    show("cuBLAS outer (M,r)@(r,C) + b", lambda: torch.nn.functional.linear(small, w_up, b_dim))
    for shape in ((16, 256, 4), (32, 256, 4), (16, 512, 8)):
        tiles(("OUTER_ROWS", "OUTER_COLS", "OUTER_WARPS"), shape)
        show(f"outer rows {shape[0]} cols {shape[1]} warps {shape[2]}", lambda: skinny.outer(small, w_up, b_dim),
             lambda: torch.nn.functional.linear(small, w_up, b_dim))
    show("cuBLAS wgrad (C,M)@(M,r)", lambda: g_act.t() @ small)
    show("cuBLAS wgrad + torch column sums", lambda: (g_act.t() @ small, g_act.sum(0)))
    for shape in ((1024, 64, 128, 4), (512, 64, 128, 4), (1024, 128, 128, 8), (2048, 64, 128, 4)):
        tiles(("WGRAD_ROWS", "WGRAD_TILE", "WGRAD_COLS", "WGRAD_WARPS"), shape)
        show(f"wgrad rows {shape[0]} tile {shape[1]} cols {shape[2]} warps {shape[3]}",
             lambda: skinny.wgrad(g_act, small), lambda: g_act.t() @ small)
    tiles(defaults, defaults.values())
    show("wgrad with a column of ones (+ the bias gradient)", lambda: skinny.wgrad(g_act, small_ones),
         lambda: torch.cat([g_act.t() @ small, g_act.sum(0, keepdim=True).t()], 1))
    print(f"defaults: {defaults}")


if __name__ == "__main__":
    kernel_times()
