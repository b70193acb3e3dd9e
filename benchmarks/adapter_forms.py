"""Other ways to compute the shared_parallel adapter, for `step_overhead.py` (a GPU development tool).

Every form computes the module's maths (`gist_exp.models.adapter.Adapter.forward`); they differ in the
kernels inductor makes of them. On the H200 each one made the compiled ViT-B/16 step slower than the
plain module, whose bottleneck projections run as cuBLAS GEMMs (benchmarks/RESULTS.md):

| form | step | plain module, same run |
|---|---|---|
| unrolled: up-projection as 4 broadcast multiply-adds, autograd | 19.22 ms | 17.92 ms |
| fusable-mm: every activation-sized op a reduction or pointwise, weight gradients by GEMM | 20.09 ms | 18.04 ms |
| fusable-red: the same, weight gradients by column reductions | 21.40 ms | 18.04 ms |
| fusable-auto: the fusable forward, autograd | fails under torch 2.11 (the Gist token's gradient shape) | |
| up-pointwise: up-projection pointwise, its backward by the GEMMs autocast runs | 17.89 ms | 17.63 ms |
| pointwise: also the down-projection's input gradient pointwise | 18.28 ms | 17.63 ms |

    PYTHONPATH=src python benchmarks/adapter_forms.py   # checks every form against the module in float64
"""

from __future__ import annotations

import functools

import torch


def rowdots(x, weight):
    """x [..., C] @ weight[r, C].T as r row reductions (inductor can fuse them with a LayerNorm over x)."""
    return torch.stack([(x * w).sum(-1) for w in weight.unbind(0)], -1)


def multiply_adds(h, weight):
    """h [..., r] @ weight[C, r].T as r broadcast multiply-adds (pointwise, fusable into a residual sum)."""
    out = h[..., 0:1] * weight[:, 0]
    for k in range(1, h.shape[-1]):
        out = out + h[..., k:k + 1] * weight[:, k]
    return out


class FusableAdapterFn(torch.autograd.Function):
    """The GELU bottleneck adapter with every activation-sized op written as a reduction or a pointwise
    op, forward and backward; the weight gradients are GEMMs (`mm`) or column reductions (`red`)."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, scale, weight_grads):
        z = rowdots(x, w_down) + b_down
        out = (multiply_adds(torch.nn.functional.gelu(z), w_up) + b_up) * scale
        ctx.save_for_backward(x, z, w_down, w_up)
        ctx.scale, ctx.weight_grads = scale, weight_grads
        return out

    @staticmethod
    def backward(ctx, grad):
        x, z, w_down, w_up = ctx.saved_tensors
        g = grad * ctx.scale
        h = torch.nn.functional.gelu(z)
        dz = torch.ops.aten.gelu_backward(rowdots(g, w_up.t()), z)
        dx = multiply_adds(dz, w_down.t())
        g2, h2, dz2, x2 = (t.reshape(-1, t.shape[-1]) for t in (g, h, dz, x))
        if ctx.weight_grads == "mm":
            d_w_up, d_w_down = g2.t() @ h2, dz2.t() @ x2
        else:
            d_w_up = torch.stack([(g2 * h2[:, j:j + 1]).sum(0) for j in range(h2.shape[1])], -1)
            d_w_down = torch.stack([(x2 * dz2[:, j:j + 1]).sum(0) for j in range(dz2.shape[1])], 0)
        return dx, d_w_down, dz2.sum(0), d_w_up, g2.sum(0), None, None


def unrolled_up(adapter, x):
    """The adapter with its up-projection as broadcast multiply-adds, differentiated by autograd."""
    hidden = adapter.act(adapter.down(x))
    return (multiply_adds(hidden, adapter.up.weight) + adapter.up.bias) * adapter.scale


def matmul_dtype(x):
    """The dtype autocast would run a matmul on x in."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class DownProjection(torch.autograd.Function):
    """F.linear(x, weight, bias) whose input gradient is `r` broadcast multiply-adds (pointwise, so
    inductor fuses it into the residual gradient sum) instead of a K = r GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = matmul_dtype(x)
        x_mm = x.to(dtype)
        ctx.save_for_backward(x_mm, weight)
        return torch.nn.functional.linear(x_mm, weight.to(dtype), bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x_mm, weight = ctx.saved_tensors
        grad_x = multiply_adds(grad, weight.t())
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = flat.t() @ x_mm.reshape(-1, x_mm.shape[-1])
        return grad_x, grad_w.to(weight.dtype), flat.sum(0).to(weight.dtype)


class UpProjection(torch.autograd.Function):
    """F.linear(h, weight, bias) * scale as `r` broadcast multiply-adds (pointwise, fused into the
    residual sum) instead of a K = r GEMM; the backward keeps the GEMMs autocast would run."""

    @staticmethod
    def forward(ctx, h, weight, bias, scale):
        ctx.save_for_backward(h, weight)
        ctx.scale = scale
        return (multiply_adds(h, weight) + bias) * scale

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_mm = grad.to(h.dtype)
        grad_h = grad_mm @ weight.to(h.dtype)
        grad_w = grad_mm.reshape(-1, grad.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        return grad_h, grad_w.to(weight.dtype), grad.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype), None


def up_pointwise(adapter, x):
    h = adapter.act(adapter.down(x))
    return UpProjection.apply(h, adapter.up.weight, adapter.up.bias, adapter.scale)


def both_pointwise(adapter, x):
    h = adapter.act(DownProjection.apply(x, adapter.down.weight, adapter.down.bias))
    return UpProjection.apply(h, adapter.up.weight, adapter.up.bias, adapter.scale)


def fusable_auto(adapter, x):
    """The same forward as FusableAdapterFn, differentiated by autograd."""
    h = adapter.act(rowdots(x, adapter.down.weight) + adapter.down.bias)
    return (multiply_adds(h, adapter.up.weight) + adapter.up.bias) * adapter.scale


def fusable_fn(weight_grads, adapter, x):
    return FusableAdapterFn.apply(x, adapter.down.weight, adapter.down.bias, adapter.up.weight,
                                  adapter.up.bias, adapter.scale, weight_grads)


FORMS = {"unrolled": unrolled_up, "up-pointwise": up_pointwise, "pointwise": both_pointwise, "fusable-auto": fusable_auto,
         "fusable-mm": functools.partial(fusable_fn, "mm"), "fusable-red": functools.partial(fusable_fn, "red")}


def outputs_and_grads(forward, x, grad, params) -> list[torch.Tensor]:
    """forward(x), then the gradients of x and params for the output gradient `grad`."""
    x.grad = None
    for p in params:
        p.grad = None
    out = forward(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in params]


def compare_forms(reference, forms: dict, x, grad, params) -> None:
    """Print each form's largest difference from `reference` in outputs and gradients; exit when one
    differs by more than float64 rounding."""
    expected = outputs_and_grads(reference, x, grad, params)
    worst = 0.0
    for name, forward in forms.items():
        error = max((e - o).abs().max().item() for e, o in zip(expected, outputs_and_grads(forward, x, grad, params)))
        worst = max(worst, error)
        print(f"{name:<14} max |difference| {error:.2e}")
    if worst > 1e-10:
        raise SystemExit(f"a form differs from the plain module by {worst:.2e}")


def check() -> None:
    """Outputs and gradients of every form against the plain module, in float64 on the CPU."""
    from torch import nn

    from gist_exp.models.adapter import Adapter

    torch.manual_seed(0)
    adapter = Adapter(768, 4, 0.1, nn.GELU, "trunc_normal").double()
    x = torch.randn(2, 198, 768, dtype=torch.double, requires_grad=True)
    grad = torch.randn(2, 198, 768, dtype=torch.double)
    forms = {name: functools.partial(form, adapter) for name, form in FORMS.items()}
    compare_forms(adapter, forms, x, grad, list(adapter.parameters()))


if __name__ == "__main__":
    check()
