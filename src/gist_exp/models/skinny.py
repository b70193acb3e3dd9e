"""Linear layers with one tiny side (an adapter's projections) as Triton kernels written for that shape.

An adapter's down (C -> r) and up (r -> C) projections, r = 4, are six thin GEMMs per call (forward, input
gradient, weight gradient of each). cuBLAS runs them at 12-18 us each on an H200, a third to a half of the HBM
rate for the one activation-sized operand each moves; these kernels run them at 4.6-9.4 us (benchmarks/RESULTS.md):
- `thin`:  x[M, K] @ w[N, K].T + b, N tiny: a tensor-core dot per block of rows, N padded to 16;
- `outer`: u[M, K] @ w[N, K].T + b, K tiny: K broadcast multiply-adds per output element;
- `wgrad`: big[M, C].T @ small[M, R] by blocks of rows, then a sum over the blocks (no atomics, so a step
  is reproducible); a column of ones appended to `small` gives big's column sums (a bias gradient) too.
Operands and outputs keep their dtype; products accumulate in fp32, as cuBLAS does under autocast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

SMALL = 15  # the largest tiny side (the weight gradient pads it, with a column of ones, to 16)
THIN_ROWS, THIN_COLS, THIN_WARPS = 64, 128, 4  # tile shapes timed on an H200 (benchmarks/skinny_linear.py)
OUTER_ROWS, OUTER_COLS, OUTER_WARPS = 16, 256, 4
WGRAD_ROWS, WGRAD_TILE, WGRAD_COLS, WGRAD_WARPS = 1024, 64, 128, 4


@triton.jit
def _thin(x_ptr, w_ptr, b_ptr, out_ptr, rows_total, K, N: tl.constexpr, HAS_BIAS: tl.constexpr,
          IEEE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    outs = tl.arange(0, 16)
    row_ok, out_ok = rows < rows_total, outs < N
    acc = tl.zeros((BM, 16), tl.float32)
    for start in range(0, K, BK):
        cols = start + tl.arange(0, BK)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + outs[None, :] * K + cols[:, None], mask=out_ok[None, :] & col_ok[:, None], other=0.0)
        if IEEE:  # fp32 operands: no TF32 rounding
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + outs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def _outer(u_ptr, w_ptr, b_ptr, out_ptr, rows_total, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < rows_total, cols < N
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.static_range(K):
        u = tl.load(u_ptr + rows * K + k, mask=row_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols * K + k, mask=col_ok, other=0.0).to(tl.float32)
        acc += u[:, None] * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _wgrad(big_ptr, small_ptr, part_ptr, rows_total, C, R: tl.constexpr, IEEE: tl.constexpr,
           ROWS: tl.constexpr, TILE: tl.constexpr, BC: tl.constexpr):
    block = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    ranks = tl.arange(0, 16)
    col_ok, rank_ok = cols < C, ranks < R
    acc = tl.zeros((BC, 16), tl.float32)
    for start in range(0, ROWS, TILE):
        rows = block * ROWS + start + tl.arange(0, TILE)
        row_ok = rows < rows_total
        big = tl.load(big_ptr + rows[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        small = tl.load(small_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                        other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(big), small, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(big), small, acc)
    tl.store(part_ptr + block * C * R + cols[:, None] * R + ranks[None, :], acc,
             mask=col_ok[:, None] & rank_ok[None, :])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


@triton_op("gist_exp::skinny_thin", mutates_args=())
def thin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x[..., K] @ w[N, K].T + b (b empty: none), N <= SMALL."""
    rows, (n, k) = _rows(x), w.shape
    out = x.new_empty((*x.shape[:-1], n))
    wrap_triton(_thin)[(triton.cdiv(rows, THIN_ROWS),)](
        x, w, b, out, rows, k, N=n, HAS_BIAS=b.numel() > 0, IEEE=x.dtype == torch.float32, BM=THIN_ROWS,
        BK=THIN_COLS, num_warps=THIN_WARPS, num_stages=3)
    return out


@triton_op("gist_exp::skinny_outer", mutates_args=())
def outer(u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """u[..., K] @ w[N, K].T + b (b empty: none), K <= SMALL."""
    rows, (n, k) = _rows(u), w.shape
    out = u.new_empty((*u.shape[:-1], n))
    grid = (triton.cdiv(rows, OUTER_ROWS), triton.cdiv(n, OUTER_COLS))
    wrap_triton(_outer)[grid](u, w, b, out, rows, n, K=k, HAS_BIAS=b.numel() > 0, BM=OUTER_ROWS, BN=OUTER_COLS,
                              num_warps=OUTER_WARPS)
    return out


@triton_op("gist_exp::skinny_wgrad", mutates_args=())
def wgrad(big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """big[M, C].T @ small[M, R] as (C, R) in big's dtype, R <= 16; big and small contiguous."""
    rows, c, r = _rows(big), big.shape[-1], small.shape[-1]
    blocks = triton.cdiv(rows, WGRAD_ROWS)
    part = big.new_empty((blocks, c, r), dtype=torch.float32)
    wrap_triton(_wgrad)[(blocks, triton.cdiv(c, WGRAD_COLS))](
        big, small, part, rows, c, R=r, IEEE=big.dtype == torch.float32, ROWS=WGRAD_ROWS, TILE=WGRAD_TILE,
        BC=WGRAD_COLS, num_warps=WGRAD_WARPS)
    return part.sum(0).to(big.dtype)


@triton_op("gist_exp::skinny_linear", mutates_args=())
def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w, b) (b empty: none) by `thin` or `outer`, whichever side of w is tiny."""
    return thin(x, w, b) if w.shape[0] <= SMALL else outer(x, w, b)


def _setup_context(ctx, inputs, output) -> None:
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b.numel() > 0


def _backward(ctx, g):
    x, w = ctx.saved_tensors
    n, k = w.shape
    shape = x.shape
    g, x = g.reshape(-1, n).contiguous(), x.reshape(-1, k)
    empty = g.new_empty(0)
    g_b = None
    if n <= SMALL:  # e.g. down: g is tiny (M, n), x the activation (M, k)
        g_x = outer(g, w.t().contiguous(), empty)
        g_w = wgrad(x, g).t()
        if ctx.has_bias:
            g_b = g.sum(0)
    else:  # e.g. up: g is the activation (M, n), x tiny (M, k)
        g_x = thin(g, w.t().contiguous(), empty)
        if ctx.has_bias:  # a column of ones: the same pass over g sums its columns
            both = wgrad(g, torch.cat([x, x.new_ones(x.shape[0], 1)], 1))
            g_w, g_b = both[:, :k], both[:, k]
        else:
            g_w = wgrad(g, x)
    return g_x.view(shape), g_w, g_b


# autograd through torch.library rather than an autograd.Function: compiled graphs holding these ops
# stay cacheable by AOTAutograd (its cache bypasses graphs with custom autograd.Functions)
_linear.register_autograd(_backward, setup_context=_setup_context)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for a weight with a side <= SMALL, on a GPU (or in Triton's CPU interpreter)."""
    if min(w.shape) > SMALL:
        raise ValueError(f"skinny_linear: weight {tuple(w.shape)} has no side <= {SMALL}")
    return _linear(x.contiguous(), w.contiguous(), b if b is not None else x.new_empty(0))
