"""Other ways to compute a `ParallelAdapterBlock`, for `step_overhead.py --block-form` (a GPU development tool).

merged: the adapter's up-projection shares the GEMM of the frozen projection it is added to (the
attention's `proj`, then the MLP's `fc2`): cat([a, h]) @ cat([W, scale * W_up]).T. The K = 4 forward
GEMM and the input-gradient GEMM of the up-projection disappear into the large GEMMs; only its
weight gradient stays a GEMM of its own. A measuring prototype: drop-path 0, LayerScale off.

On the H200 it saved nothing (benchmarks/RESULTS.md, fifth session): 17.74 and 17.73 ms against
17.82 and 17.40 ms for the plain block, alternating processes. Per step (profile, 5 steps) the small
GEMMs took 0.76 ms less, but writing the concatenated inputs cost more: the GELU kernel that writes
fc2's input 0.62 ms more (110 us a call instead of 58), a new copy of the attention output (a view
before) 0.22 ms, and the wider large GEMMs 0.19 ms.

    PYTHONPATH=src python benchmarks/block_forms.py   # checks every form against the block in float64
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from adapter_forms import compare_forms


class MergedLinear(torch.autograd.Function):
    """cat([a, h], -1) @ cat([w_frozen, w], 1).T + bias, with gradients for a, h, w and bias only.
    K is padded with zeros to a multiple of 8 so that the bf16 rows stay 16-byte aligned."""

    @staticmethod
    def forward(ctx, a, h, w_frozen, w, bias):
        dtype = a.dtype  # bf16 under autocast: a comes out of a bf16 kernel
        pad = -(a.shape[-1] + h.shape[-1]) % 8
        inputs, weights = [a, h.to(dtype)], [w_frozen.to(dtype), w.to(dtype)]
        if pad:
            inputs.append(a.new_zeros(*a.shape[:-1], pad))
            weights.append(a.new_zeros(w.shape[0], pad))
        weight = torch.cat(weights, 1)
        ctx.save_for_backward(h, weight)
        ctx.split, ctx.weight_dtype, ctx.bias_dtype = a.shape[-1], w.dtype, bias.dtype
        return F.linear(torch.cat(inputs, -1), weight, bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        k, r = ctx.split, h.shape[-1]
        grad_in = grad @ weight
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat.t() @ h.reshape(-1, r).to(grad.dtype)).to(ctx.weight_dtype)
        grad_bias = flat.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.bias_dtype)
        return grad_in[..., :k], grad_in[..., k:k + r].to(h.dtype), None, grad_w, grad_bias


def merged(block, x):
    b, a = block.block, block.adapter
    attn, mlp = b.attn, b.mlp
    batch, tokens, dim = x.shape
    up_weight, up_bias = a.up.weight * a.scale, a.up.bias * a.scale
    qkv = attn.qkv(b.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if block.training else 0.0)
    o = attn.norm(o.transpose(1, 2).reshape(batch, tokens, dim))
    x = x + MergedLinear.apply(o, a.act(a.down(x)), attn.proj.weight, up_weight, attn.proj.bias + up_bias)
    z = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(b.norm2(x)))))
    return x + MergedLinear.apply(z, a.act(a.down(x)), mlp.fc2.weight, up_weight, mlp.fc2.bias + up_bias)


FORMS = {"merged": merged}


def use_form(model: torch.nn.Module, form: str) -> None:
    from gist_exp.models.adapter import ParallelAdapterBlock
    for module in model.modules():
        if isinstance(module, ParallelAdapterBlock):
            module.forward = functools.partial(FORMS[form], module)


def check() -> None:
    """Outputs and gradients of every form against the plain blocks, in float64 on the CPU."""
    from timm.models.vision_transformer import VisionTransformer
    from gist_exp.models.adapter import add_adapters

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3)
    add_adapters(vit)
    vit = vit.double()
    for module in vit.modules():
        if hasattr(module, "bias") and isinstance(module.bias, torch.nn.Parameter):
            torch.nn.init.normal_(module.bias, std=0.1)  # zero biases would hide a wrong bias gradient
    trainable = [p for n, p in vit.named_parameters() if "adapter" in n]
    for p in vit.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    x = torch.randn(2, 17, 64, dtype=torch.double, requires_grad=True)
    grad = torch.randn(2, 17, 64, dtype=torch.double)

    def through_blocks(form):
        return lambda h: functools.reduce(lambda h, block: form(block, h), vit.blocks, h)

    compare_forms(vit.blocks, {name: through_blocks(form) for name, form in FORMS.items()}, x, grad, trainable)


if __name__ == "__main__":
    check()
