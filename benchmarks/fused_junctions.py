"""The memory-bound work between the GEMMs of an adapter ViT as one Triton kernel per residual junction,
for `step_overhead.py --block-form junctions` (a GPU development tool).

A shared_parallel adapter block is x1 = x0 + attn(norm1(x0)) + a(x0); x2 = x1 + mlp(norm2(x1)) + a(x1),
with a(x) = up(GELU(down(x))) * scale. Between the large GEMMs, a "junction" does, row by row:

    x_new = x + keep * branch + scale * up(GELU(h_prev))   # the residual sum, fp32 stream
    ln    = LayerNorm_next(x_new)                            # input of the next qkv or fc1 GEMM
    h_new = down_next(x_new)                                 # the next adapter's bottleneck

where `next` is the same block's norm2 and adapter after attention, and the next block's norm1 and
adapter after the MLP. One forward kernel reads x and the branch once and writes x_new and ln once;
the bottleneck (4 values a row) stays in registers. One backward kernel does the LayerNorm backward,
both adapter projections' input gradients, the residual sum, and per-program partial sums of the four
adapter weight gradients (no atomics). The adapters' K = 4 / N = 4 GEMMs disappear. The adapter is
computed in fp32 from the fp32 stream (autocast rounds its input and output to bf16). Measuring
prototype: exact GELU, LayerScale off, frozen LayerNorms.

On the H200 it saved nothing (benchmarks/RESULTS.md, sixth session): 18.04 and 17.95 ms per step
against 17.98 ms for the plain blocks. The traffic argument holds (a junction moves 117 MB forward and
156 MB backward, about 30 and 42 us at the 3.7 TB/s of a plain copy), but these kernels run far below
it: forward 54 us, backward 146-167 us, of which the weight-gradient sums are only 16-48 us.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fused_junctions.py   # checks it on the CPU
    PYTHONPATH=src python benchmarks/fused_junctions.py cuda    # on a GPU: eager and compiled, autocast error
    PYTHONPATH=src python benchmarks/fused_junctions.py times   # each kernel alone, for a few tile shapes
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from adapter_forms import outputs_and_grads

ROWS = 4  # token rows per loop step of a program
WARPS = 4
PROGRAMS = 264  # persistent programs of the backward kernel (2 per SM of an H200)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _junction_forward(x_ptr, branch_ptr, keep_ptr, h_prev_ptr, up_w_ptr, up_b_ptr, ln_w_ptr, ln_b_ptr,
                      down_w_ptr, down_b_ptr, x_new_ptr, ln_ptr, mean_ptr, rstd_ptr, h_new_ptr,
                      rows_total, dim, tokens, scale, eps,
                      HAS_BRANCH: tl.constexpr, HAS_LN: tl.constexpr, HAS_DOWN: tl.constexpr,
                      RANK_PREV: tl.constexpr, RANK_NEXT: tl.constexpr, RP: tl.constexpr, RN: tl.constexpr,
                      ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_ok, col_ok = rows < rows_total, cols < dim
    tile = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * dim + cols[None, :]
    y = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        keep = tl.load(keep_ptr + rows // tokens, mask=row_ok, other=0.0)
        y += tl.load(branch_ptr + offsets, mask=tile, other=0.0).to(tl.float32) * keep[:, None]
        rp = tl.arange(0, RP)
        u = _gelu(tl.load(h_prev_ptr + rows[:, None] * RANK_PREV + rp[None, :],
                          mask=row_ok[:, None] & (rp < RANK_PREV)[None, :], other=0.0))
        up_w = tl.load(up_w_ptr + cols[None, :] * RANK_PREV + rp[:, None],  # up.weight is (dim, rank)
                       mask=col_ok[None, :] & (rp < RANK_PREV)[:, None], other=0.0)
        adapted = tl.sum(u[:, :, None] * up_w[None, :, :], axis=1)
        adapted += tl.load(up_b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        y += adapted * scale
        tl.store(x_new_ptr + offsets, y, mask=tile)
    if HAS_LN:
        mean = tl.sum(y, axis=1) / dim
        centred = tl.where(tile, y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
        w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0)
        b = tl.load(ln_b_ptr + cols, mask=col_ok, other=0.0)
        ln = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(ln_ptr + offsets, ln.to(ln_ptr.dtype.element_ty), mask=tile)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if HAS_DOWN:
        rn = tl.arange(0, RN)
        down_w = tl.load(down_w_ptr + rn[:, None] * dim + cols[None, :],  # down.weight is (rank, dim)
                         mask=(rn < RANK_NEXT)[:, None] & col_ok[None, :], other=0.0)
        h = tl.sum(y[:, None, :] * down_w[None, :, :], axis=2)
        h += tl.load(down_b_ptr + rn, mask=rn < RANK_NEXT, other=0.0)[None, :]
        tl.store(h_new_ptr + rows[:, None] * RANK_NEXT + rn[None, :], h,
                 mask=row_ok[:, None] & (rn < RANK_NEXT)[None, :])


@triton.jit
def _junction_backward(g_x_new_ptr, g_ln_ptr, g_h_new_ptr, y_ptr, mean_ptr, rstd_ptr, ln_w_ptr, down_w_ptr,
                       keep_ptr, h_prev_ptr, up_w_ptr,
                       g_x_ptr, g_branch_ptr, g_h_prev_ptr, part_down_w_ptr, part_down_b_ptr, part_up_w_ptr,
                       part_up_b_ptr, rows_total, dim, tokens, scale, steps,
                       HAS_GX: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_LN: tl.constexpr,
                       HAS_DOWN: tl.constexpr, RANK_PREV: tl.constexpr, RANK_NEXT: tl.constexpr,
                       RP: tl.constexpr, RN: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                       ACCUMULATE: tl.constexpr = True):
    """Each program handles `steps` blocks of ROWS rows, strided by the number of programs, and writes its
    partial sums of the adapter weight gradients once (no atomics: a step is reproducible)."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, COLS)
    col_ok = cols < dim
    rp, rn = tl.arange(0, RP), tl.arange(0, RN)
    rp_ok, rn_ok = rp < RANK_PREV, rn < RANK_NEXT
    acc_down_w = tl.zeros((RN, COLS), tl.float32)
    acc_down_b = tl.zeros((RN,), tl.float32)
    acc_up_w = tl.zeros((RP, COLS), tl.float32)
    acc_up_b = tl.zeros((COLS,), tl.float32)
    if HAS_LN:
        ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0)
    if HAS_DOWN:
        down_w = tl.load(down_w_ptr + rn[:, None] * dim + cols[None, :], mask=rn_ok[:, None] & col_ok[None, :],
                         other=0.0)
    if HAS_BRANCH:
        up_w = tl.load(up_w_ptr + cols[None, :] * RANK_PREV + rp[:, None], mask=col_ok[None, :] & rp_ok[:, None],
                       other=0.0)
    for step in range(steps):
        rows = (step * programs + pid) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < rows_total
        tile = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * dim + cols[None, :]
        if HAS_GX:
            g = tl.load(g_x_new_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        else:
            g = tl.zeros((ROWS, COLS), tl.float32)
        if HAS_LN or HAS_DOWN:
            y = tl.load(y_ptr + offsets, mask=tile, other=0.0)
        if HAS_LN:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            x_hat = tl.where(tile, (y - mean[:, None]) * rstd[:, None], 0.0)
            g_x_hat = tl.load(g_ln_ptr + offsets, mask=tile, other=0.0).to(tl.float32) * ln_w[None, :]
            c1 = tl.sum(g_x_hat * x_hat, axis=1) / dim
            c2 = tl.sum(g_x_hat, axis=1) / dim
            g += tl.where(tile, rstd[:, None] * (g_x_hat - x_hat * c1[:, None] - c2[:, None]), 0.0)
        if HAS_DOWN:
            g_h = tl.load(g_h_new_ptr + rows[:, None] * RANK_NEXT + rn[None, :], mask=row_ok[:, None] & rn_ok[None, :],
                          other=0.0)
            g += tl.sum(g_h[:, :, None] * down_w[None, :, :], axis=1)
            if ACCUMULATE:  # False only to time the rest (kernel_times)
                acc_down_w += tl.sum(g_h[:, :, None] * y[:, None, :], axis=0)
                acc_down_b += tl.sum(g_h, axis=0)
        tl.store(g_x_ptr + offsets, g, mask=tile)
        if HAS_BRANCH:
            keep = tl.load(keep_ptr + rows // tokens, mask=row_ok, other=0.0)
            tl.store(g_branch_ptr + offsets, (g * keep[:, None]).to(g_branch_ptr.dtype.element_ty), mask=tile)
            h_prev = tl.load(h_prev_ptr + rows[:, None] * RANK_PREV + rp[None, :],
                             mask=row_ok[:, None] & rp_ok[None, :], other=0.0)
            g_u = tl.sum(g[:, None, :] * up_w[None, :, :], axis=2) * scale
            tl.store(g_h_prev_ptr + rows[:, None] * RANK_PREV + rp[None, :], g_u * _gelu_grad(h_prev),
                     mask=row_ok[:, None] & rp_ok[None, :])
            if ACCUMULATE:
                acc_up_w += tl.sum(_gelu(h_prev)[:, :, None] * g[:, None, :], axis=0)
                acc_up_b += tl.sum(g, axis=0)
    if HAS_DOWN:
        tl.store(part_down_w_ptr + pid * RN * dim + rn[:, None] * dim + cols[None, :], acc_down_w,
                 mask=rn_ok[:, None] & col_ok[None, :])
        tl.store(part_down_b_ptr + pid * RN + rn, acc_down_b)
    if HAS_BRANCH:
        tl.store(part_up_w_ptr + pid * RP * dim + rp[:, None] * dim + cols[None, :], acc_up_w,
                 mask=rp_ok[:, None] & col_ok[None, :])
        tl.store(part_up_b_ptr + pid * dim + cols, acc_up_b, mask=col_ok)



def _present(t: torch.Tensor) -> bool:
    return t.numel() > 0


def _rank(w: torch.Tensor, dim_index: int) -> int:
    return w.shape[dim_index] if _present(w) else 1


@triton_op("gist_exp::junction", mutates_args=())
def _junction(x: torch.Tensor, branch: torch.Tensor, keep: torch.Tensor, h_prev: torch.Tensor, up_w: torch.Tensor,
              up_b: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, down_w: torch.Tensor,
              down_b: torch.Tensor, tokens: int, scale: float, eps: float, ln_bf16: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_new, ln, mean, rstd, h_new); an absent part (an empty tensor in) gives an empty one out."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    has_branch, has_ln, has_down = _present(branch), _present(ln_w), _present(down_w)
    rank_prev, rank_next = _rank(up_w, 1), _rank(down_w, 0)
    x_new = torch.empty_like(x) if has_branch else x.new_empty(0)
    ln_dtype = torch.bfloat16 if ln_bf16 else x.dtype
    ln = torch.empty(x.shape, dtype=ln_dtype, device=x.device) if has_ln else x.new_empty(0)
    mean = x.new_empty(rows if has_ln else 0, dtype=torch.float32)
    rstd = x.new_empty(rows if has_ln else 0, dtype=torch.float32)
    h_new = x.new_empty((*x.shape[:-1], rank_next) if has_down else (0,), dtype=torch.float32)
    wrap_triton(_junction_forward)[(triton.cdiv(rows, ROWS),)](
        x, branch, keep, h_prev, up_w, up_b, ln_w, ln_b, down_w, down_b, x_new, ln, mean, rstd, h_new,
        rows, dim, tokens, scale, eps, HAS_BRANCH=has_branch, HAS_LN=has_ln, HAS_DOWN=has_down,
        RANK_PREV=rank_prev, RANK_NEXT=rank_next, RP=triton.next_power_of_2(rank_prev),
        RN=triton.next_power_of_2(rank_next), ROWS=ROWS, COLS=triton.next_power_of_2(dim), num_warps=WARPS)
    return x_new, ln, mean, rstd, h_new


@triton_op("gist_exp::junction_backward", mutates_args=())
def _junction_backward_op(g_x_new: torch.Tensor, g_ln: torch.Tensor, g_h_new: torch.Tensor, y: torch.Tensor,
                          mean: torch.Tensor, rstd: torch.Tensor, ln_w: torch.Tensor, down_w: torch.Tensor,
                          keep: torch.Tensor, h_prev: torch.Tensor, up_w: torch.Tensor, branch_bf16: bool,
                          tokens: int, scale: float, programs: int, accumulate: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
    """Returns the gradients of x, branch, h_prev, down.weight, down.bias, up.weight, up.bias."""
    dim = y.shape[-1]
    rows = y.numel() // dim
    has_branch, has_ln, has_down = _present(up_w), _present(ln_w), _present(down_w)
    rank_prev, rank_next = _rank(up_w, 1), _rank(down_w, 0)
    rp, rn = triton.next_power_of_2(rank_prev), triton.next_power_of_2(rank_next)
    blocks = triton.cdiv(rows, ROWS)
    programs = min(programs, blocks)
    f32 = dict(dtype=torch.float32, device=y.device)
    g_x = torch.empty(y.shape, **f32)
    g_branch = torch.empty(y.shape, dtype=torch.bfloat16 if branch_bf16 else torch.float32, device=y.device) \
        if has_branch else y.new_empty(0)
    g_h_prev = torch.empty(h_prev.shape, **f32) if has_branch else y.new_empty(0)
    part_down_w = torch.zeros((programs, rn, dim) if has_down else (0,), **f32)
    part_down_b = torch.zeros((programs, rn) if has_down else (0,), **f32)
    part_up_w = torch.zeros((programs, rp, dim) if has_branch else (0,), **f32)
    part_up_b = torch.zeros((programs, dim) if has_branch else (0,), **f32)
    wrap_triton(_junction_backward)[(programs,)](
        g_x_new, g_ln, g_h_new, y, mean, rstd, ln_w, down_w, keep, h_prev, up_w,
        g_x, g_branch, g_h_prev, part_down_w, part_down_b, part_up_w, part_up_b,
        rows, dim, tokens, scale, triton.cdiv(blocks, programs),
        HAS_GX=_present(g_x_new), HAS_BRANCH=has_branch, HAS_LN=has_ln, HAS_DOWN=has_down,
        RANK_PREV=rank_prev, RANK_NEXT=rank_next, RP=rp, RN=rn, ROWS=ROWS, COLS=triton.next_power_of_2(dim),
        num_warps=WARPS, **({} if accumulate else {"ACCUMULATE": False}))
    if has_down:
        g_down_w, g_down_b = part_down_w.sum(0)[:rank_next], part_down_b.sum(0)[:rank_next]
    else:
        g_down_w, g_down_b = y.new_empty(0), y.new_empty(0)
    if has_branch:
        g_up_w, g_up_b = (part_up_w.sum(0)[:rank_prev] * scale).t().contiguous(), part_up_b.sum(0) * scale
    else:
        g_up_w, g_up_b = y.new_empty(0), y.new_empty(0)
    return g_x, g_branch, g_h_prev, g_down_w, g_down_b, g_up_w, g_up_b


def _setup_context(ctx, inputs, output) -> None:
    x, branch, keep, h_prev, up_w, up_b, ln_w, ln_b, down_w, down_b, tokens, scale, eps, ln_bf16 = inputs
    x_new, ln, mean, rstd, h_new = output
    y = x_new if _present(branch) else x
    ctx.save_for_backward(y, mean, rstd, ln_w, down_w, keep, h_prev, up_w)
    ctx.tokens, ctx.scale, ctx.branch_bf16 = tokens, scale, branch.dtype == torch.bfloat16
    ctx.has_branch = _present(branch)


def _backward(ctx, g_x_new, g_ln, g_mean, g_rstd, g_h_new):
    y, mean, rstd, ln_w, down_w, keep, h_prev, up_w = ctx.saved_tensors
    empty = y.new_empty(0)
    g_x_new = g_x_new.contiguous() if ctx.has_branch and g_x_new is not None else empty
    g_ln = g_ln.contiguous() if g_ln is not None and _present(ln_w) else empty
    g_h_new = g_h_new.contiguous() if g_h_new is not None and _present(down_w) else empty
    if _present(ln_w) and not _present(g_ln):
        g_ln = torch.zeros_like(y)
    if _present(down_w) and not _present(g_h_new):
        g_h_new = y.new_zeros((*y.shape[:-1], down_w.shape[0]))
    g_x, g_branch, g_h_prev, g_down_w, g_down_b, g_up_w, g_up_b = _junction_backward_op(
        g_x_new, g_ln, g_h_new, y, mean, rstd, ln_w, down_w, keep, h_prev, up_w if ctx.has_branch else empty,
        ctx.branch_bf16, ctx.tokens, ctx.scale, PROGRAMS)
    none_if_empty = lambda t: t if _present(t) else None  # noqa: E731
    return (g_x, none_if_empty(g_branch), None, none_if_empty(g_h_prev), none_if_empty(g_up_w),
            none_if_empty(g_up_b), None, None, none_if_empty(g_down_w), none_if_empty(g_down_b),
            None, None, None, None)


_junction.register_autograd(_backward, setup_context=_setup_context)


def junction(x, branch=None, keep=None, h_prev=None, up=None, scale=1.0, norm=None, down=None):
    """(x_new, ln, h_new) of the docstring; x_new is x itself without a branch."""
    empty = x.new_empty(0)
    ln_bf16 = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
    x_new, ln, _, _, h_new = _junction(
        x.contiguous(), branch.contiguous() if branch is not None else empty,
        keep if keep is not None else empty, h_prev if h_prev is not None else empty,
        up.weight if up is not None else empty, up.bias if up is not None else empty,
        norm.weight if norm is not None else empty, norm.bias if norm is not None else empty,
        down.weight if down is not None else empty, down.bias if down is not None else empty,
        x.shape[1], float(scale), float(norm.eps) if norm is not None else 0.0, ln_bf16)
    return (x_new if branch is not None else x), ln, h_new


def keep_scale(drop_path, batch: int, device) -> torch.Tensor:
    """Per-sample branch scale of `gist_exp.models.backbone.DropPath`, drawn as it draws its mask."""
    if isinstance(drop_path, torch.nn.Identity) or not drop_path.training:
        return torch.ones(batch, device=device)
    return (torch.rand(batch, device=device) < drop_path.keep).float() / drop_path.keep


class JunctionStack(torch.nn.Module):
    """Runs a ModuleList of ParallelAdapterBlocks through junctions (same parameters, so same optimizer)."""

    def __init__(self, blocks: torch.nn.ModuleList):
        super().__init__()
        self.blocks = blocks
        for pb in blocks:
            b = pb.block
            if not (isinstance(b.ls1, torch.nn.Identity) and isinstance(b.ls2, torch.nn.Identity)
                    and isinstance(pb.adapter.act, torch.nn.GELU) and pb.adapter.act.approximate == "none"):
                raise ValueError("junctions need LayerScale off and an exact-GELU adapter")

    def forward(self, x):
        blocks = self.blocks
        batch = x.shape[0]
        first = blocks[0]
        _, ln, h = junction(x, norm=first.block.norm1, down=first.adapter.down)
        for i, pb in enumerate(blocks):
            b, a = pb.block, pb.adapter
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            branch = b.attn(ln)
            x, ln, h_mid = junction(x, branch, keep_scale(b.drop_path1, batch, x.device), h, a.up, a.scale,
                                    b.norm2, a.down)
            branch = b.mlp(ln)
            x, ln, h = junction(x, branch, keep_scale(b.drop_path2, batch, x.device), h_mid, a.up, a.scale,
                                nxt.block.norm1 if nxt is not None else None,
                                nxt.adapter.down if nxt is not None else None)
        return x


def use_junctions(model) -> None:
    """Swap a PeftViT's blocks for one JunctionStack over them (parameter objects unchanged)."""
    vit = model.vit
    vit.blocks = torch.nn.ModuleList([JunctionStack(vit.blocks)])


def check(device: str = "cpu", compiled: bool = False) -> float:
    """The junction stack (torch.compiled if asked) against the plain blocks, fp32, drop-path 0.3 with the
    same masks."""
    from timm.models.vision_transformer import VisionTransformer
    from gist_exp.models.adapter import add_adapters
    from gist_exp.models.backbone import DropPath

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=3)
    for block in vit.blocks:
        block.drop_path1, block.drop_path2 = DropPath(0.3), DropPath(0.3)
    add_adapters(vit)
    vit = vit.to(device)
    for module in vit.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
            torch.nn.init.normal_(module.bias, std=0.3)
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.3)
            torch.nn.init.normal_(module.bias, std=0.3)
    trainable = [p for n, p in vit.named_parameters() if "adapter" in n]
    trainable_ids = {id(p) for p in trainable}
    for p in vit.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    stack = JunctionStack(vit.blocks)
    if compiled:
        torch._inductor.config.fallback_random = True  # the eager generator's drop-path masks
        stack = torch.compile(stack, dynamic=False)
    x = torch.randn(3, 17, 48, device=device, requires_grad=True)  # 51 rows: no tile is full
    grad = torch.randn(3, 17, 48, device=device)

    def same_masks(forward):
        return lambda h: (torch.manual_seed(1), forward(h))[1]

    expected = outputs_and_grads(same_masks(torch.nn.Sequential(*vit.blocks)), x, grad, trainable)
    got = outputs_and_grads(same_masks(stack), x, grad, trainable)
    worst = max(((e - g).abs().max() / e.abs().max()).item() for e, g in zip(expected, got))
    print(f"junctions: largest difference relative to the largest value {worst:.2e}")
    return worst


def autocast_errors(device: str = "cuda") -> None:
    """ViT-B/16-sized blocks under bf16 autocast: the plain blocks' and the junctions' distance from the
    plain blocks in fp32 (outputs and adapter gradients), to see which rounding is larger."""
    from timm.models.vision_transformer import VisionTransformer
    from gist_exp.models.adapter import add_adapters

    torch.manual_seed(0)
    vit = VisionTransformer(embed_dim=768, depth=12, num_heads=12)
    add_adapters(vit)
    vit = vit.to(device)
    for n, p in vit.named_parameters():
        p.requires_grad_("adapter" in n)
    trainable = [p for p in vit.parameters() if p.requires_grad]
    stack = JunctionStack(vit.blocks)
    x = torch.randn(8, 198, 768, device=device, requires_grad=True)
    grad = torch.randn(8, 198, 768, device=device)
    plain = torch.nn.Sequential(*vit.blocks)

    def autocast(forward):
        def run(h):
            with torch.autocast(device, torch.bfloat16):
                return forward(h).float()
        return run

    exact = outputs_and_grads(plain, x, grad, trainable)
    for name, forward in (("plain blocks", plain), ("junctions", stack)):
        got = outputs_and_grads(autocast(forward), x, grad, trainable)
        out_err = ((got[0] - exact[0]).norm() / exact[0].norm()).item()
        grad_err = max(((g - e).norm() / e.norm()).item() for g, e in zip(got[1:], exact[1:]))
        print(f"bf16 autocast, {name:<12}: output rel. error {out_err:.2e}, worst gradient rel. error {grad_err:.2e}")


def kernel_times(rows: int = 64 * 198, dim: int = 768, rank: int = 4) -> None:
    """Each kernel of a middle junction alone (ViT-B/16, batch 64), for tile shapes; HBM bytes moved per
    call: forward reads x, branch, writes x_new, ln; backward reads g, g_ln, x_new, writes g_x, g_branch."""
    global ROWS, WARPS, PROGRAMS
    dev = "cuda"
    x = torch.randn(rows, dim, device=dev)
    branch = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
    keep, h = torch.ones(64, device=dev), torch.randn(rows, rank, device=dev)
    up_w, up_b = torch.randn(dim, rank, device=dev), torch.randn(dim, device=dev)
    ln_w, ln_b = torch.randn(dim, device=dev), torch.randn(dim, device=dev)
    down_w, down_b = torch.randn(rank, dim, device=dev), torch.randn(rank, device=dev)
    g, g_ln = torch.randn(rows, dim, device=dev), torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
    x = x.view(64, 198, dim)

    def timed(fn, n=50):
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / n * 1e3

    mb = rows * dim / 1e6
    empty = x.new_empty(0)
    outs = _junction(x, branch, keep, h, up_w, up_b, ln_w, ln_b, down_w, down_b, 198, 0.1, 1e-6, True)
    for ROWS, WARPS, PROGRAMS in ((2, 4, 264), (4, 4, 264), (2, 4, 528), (4, 8, 528)):
        fwd = timed(lambda: _junction(x, branch, keep, h, up_w, up_b, ln_w, ln_b, down_w, down_b, 198, 0.1, 1e-6, True))
        no_down = timed(lambda: _junction(x, branch, keep, h, up_w, up_b, ln_w, ln_b, empty, empty, 198, 0.1, 1e-6,
                                          True))
        ln_only = timed(lambda: _junction(x, empty, empty, empty, empty, empty, ln_w, ln_b, empty, empty, 198, 0.1,
                                          1e-6, True))
        bwd = timed(lambda: _junction_backward_op(g, g_ln, outs[4], outs[0], outs[2], outs[3], ln_w, down_w,
                                                  keep, h, up_w, True, 198, 0.1, PROGRAMS))
        no_sums = timed(lambda: _junction_backward_op(g, g_ln, outs[4], outs[0], outs[2], outs[3], ln_w, down_w,
                                                      keep, h, up_w, True, 198, 0.1, PROGRAMS, False))
        print(f"ROWS={ROWS} warps={WARPS} programs={PROGRAMS}: forward {fwd:.1f} us ({mb * 12 / fwd:.2f} TB/s), "
              f"without the down-projection {no_down:.1f} us, LayerNorm alone {ln_only:.1f} us "
              f"({mb * 6 / ln_only:.2f} TB/s); backward {bwd:.1f} us ({mb * 16 / bwd:.2f} TB/s), "
              f"without the weight-gradient sums {no_sums:.1f} us", flush=True)
    y = torch.randn(rows, dim, device=dev)
    ln = torch.nn.functional.layer_norm
    print(f"for scale: torch LayerNorm fp32 -> bf16 out {timed(lambda: ln(y, (dim,), ln_w, ln_b).bfloat16()):.1f} us, "
          f"a copy of one fp32 activation {timed(lambda: y.clone()):.1f} us", flush=True)


if __name__ == "__main__":
    import sys

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if device == "times":
        kernel_times()
        raise SystemExit
    if max(check(device), check(device, compiled=device != "cpu")) > 1e-5:
        raise SystemExit("the junction stack differs from the plain blocks")
    if device != "cpu":
        autocast_errors(device)
        kernel_times()
