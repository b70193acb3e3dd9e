"""The adapter's thin GEMMs alone, in the shapes of a ViT-B/16 batch of 64 (a GPU development tool).

    PYTHONPATH=src python benchmarks/thin_gemm.py

T = 64 x 198 token rows, C = 768 features, r = 4 bottleneck. Each candidate runs 20 times inside one
CUDA graph (no launch overhead), and the median of 20 replays is reported per call.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

T, C, R = 64 * 198, 768, 4


@triton.jit
def _weight_grad_kernel(a_ptr, b_ptr, part_ptr, rows_total, cols_total, rank,
                        ROWS: tl.constexpr, TILE: tl.constexpr, COLS: tl.constexpr, RANK: tl.constexpr):
    """part[g] = a[rows of group g].T @ b[same rows]: a is (T, C), b is (T, rank), part is (G, C, RANK)."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    ranks = tl.arange(0, RANK)
    acc = tl.zeros((COLS, RANK), tl.float32)
    for start in range(0, ROWS, TILE):
        rows = group * ROWS + start + tl.arange(0, TILE)
        row_ok = rows < rows_total
        a = tl.load(a_ptr + rows[:, None] * cols_total + cols[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < rank),
                    other=0.0)
        acc += tl.dot(tl.trans(a), b)
    tl.store(part_ptr + group * cols_total * RANK + cols[:, None] * RANK + ranks[None, :], acc)


def triton_weight_grad(a, b, rows=512, tile=64, cols=128):
    groups = triton.cdiv(a.shape[0], rows)
    part = torch.empty((groups, a.shape[1], 16), dtype=torch.float32, device=a.device)
    _weight_grad_kernel[(groups, a.shape[1] // cols)](a, b, part, a.shape[0], a.shape[1], b.shape[1],
                                                      ROWS=rows, TILE=tile, COLS=cols, RANK=16)
    return part.sum(0)[:, :b.shape[1]]


def split_k(a, b, splits):
    """a.T @ b with K split into `splits` chunks: one bmm, then a sum over the chunks."""
    a3 = a.view(splits, -1, a.shape[1]).transpose(1, 2)
    return torch.bmm(a3, b.view(splits, -1, b.shape[1])).sum(0)


def time_call(fn, calls=20, replays=20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    tokens, grad = torch.randn(T, C, **bf), torch.randn(T, C, **bf)
    small = torch.randn(T, R, **bf)
    w_down, w_up = torch.randn(R, C, **bf) * 0.02, torch.randn(C, R, **bf) * 0.02
    exact = grad.float().t() @ small.float()
    print(f"{'shape / candidate':<52} {'us':>7}  max |err| vs fp32")
    rows = {
        "fwd down  (T,C)@(C,r)  mm": lambda: tokens @ w_down.t(),
        "fwd up    (T,r)@(r,C)  mm": lambda: small @ w_up.t(),
        "wgrad     (C,T)@(T,r)  mm": lambda: grad.t() @ small,
        "wgrad     (r,T)@(T,C)  mm": lambda: small.t() @ grad,
    }
    for splits in (8, 16, 32, 64):
        rows[f"wgrad     (C,T)@(T,r)  bmm split-K {splits}"] = lambda s=splits: split_k(grad, small, s)
    for rows_per in (256, 512, 1024):
        rows[f"wgrad     (C,T)@(T,r)  triton {rows_per} rows/program"] = (
            lambda n=rows_per: triton_weight_grad(grad, small, rows=n))
    for name, fn in rows.items():
        try:
            us = time_call(fn)
            out = fn()
            err = (out.float() - exact).abs().max().item() if "wgrad" in name and "(C,T)" in name else float("nan")
            print(f"{name:<52} {us:>7.1f}  {err:.3g}", flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on to the next candidate
            print(f"{name:<52} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
    nbytes = tokens.numel() * tokens.element_size()
    print(f"one (T, C) bf16 tensor is {nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
