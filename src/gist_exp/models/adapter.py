"""Bottleneck adapters injected into timm's own `Block`s.

- `shared_parallel` (GIST official, default): one adapter per block on the un-normalised residual stream,
  used twice, beside both branches: x = x + attn(norm1(x)) + a(x); x = x + mlp(norm2(x)) + a(x).
- `sequential_mlp` (NOAH / Houlsby style): after the MLP branch, with its own residual: z + a(z).
"""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

try:  # Triton comes with torch's CUDA builds; without it the adapter runs nn.Linear everywhere
    from .skinny import SMALL, skinny_linear
except ImportError:
    skinny_linear = None


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * (1.702 * x).sigmoid()


# Per variant: bottleneck, output scale, activation, and the init the reference code means to use.
VARIANTS = {
    "shared_parallel": dict(bottleneck=4, scale=0.1, activation=nn.GELU, init="trunc_normal"),
    "sequential_mlp": dict(bottleneck=8, scale=1.0, activation=QuickGELU, init="xavier"),
}


class Adapter(nn.Module):
    """a(x) = up(act(down(x))) * scale.

    With `kernels`, on a GPU in 16-bit autocast, the two projections run as the Triton kernels of
    `skinny` instead of cuBLAS: the same operations in the same dtypes, faster (benchmarks/RESULTS.md)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, activation: type[nn.Module], init: str,
                 kernels: bool = True):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = activation()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.kernels = kernels and skinny_linear is not None and bottleneck <= SMALL
        for layer in (self.down, self.up):
            if init == "trunc_normal":  # what the GIST official adapter ends up with (timm's init)
                trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            else:  # NOAH's adapter init (which NOAH itself then overwrites with timm's)
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x):
        if self.kernels and x.is_cuda and torch.is_autocast_enabled(x.device.type):
            return self.forward_kernels(x, torch.get_autocast_dtype(x.device.type))
        return self.up(self.act(self.down(x))) * self.scale

    def forward_kernels(self, x, dtype: torch.dtype):
        """What autocast runs for `forward` (operands and outputs in `dtype`, fp32 accumulation)."""
        h = skinny_linear(x.to(dtype), self.down.weight.to(dtype), self.down.bias.to(dtype))
        return skinny_linear(self.act(h), self.up.weight.to(dtype), self.up.bias.to(dtype)) * self.scale


class ParallelAdapterBlock(nn.Module):
    """A timm Block with one adapter added beside both of its branches (drop-path on the frozen branches only)."""

    def __init__(self, block: Block, adapter: Adapter):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x):
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x)))) + self.adapter(x)
        x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.adapter(x)
        return x


class AdapterAfter(nn.Module):
    """Replaces a block's `drop_path2`: the MLP branch output z becomes z + a(z)."""

    def __init__(self, drop_path: nn.Module, adapter: Adapter):
        super().__init__()
        self.drop_path = drop_path
        self.adapter = adapter

    def forward(self, z):
        z = self.drop_path(z)
        return z + self.adapter(z)


def add_adapters(vit: VisionTransformer, variant: str = "shared_parallel", bottleneck: int | None = None,
                 scale: float | None = None, kernels: bool = True) -> None:
    """Inject adapters into every block, in place. `None` takes the variant's published value."""
    spec = dict(VARIANTS[variant], kernels=kernels)
    spec["bottleneck"] = bottleneck or spec["bottleneck"]
    spec["scale"] = spec["scale"] if scale is None else scale
    for i, block in enumerate(vit.blocks):
        adapter = Adapter(vit.embed_dim, **spec)
        if variant == "shared_parallel":
            vit.blocks[i] = ParallelAdapterBlock(block, adapter)
        else:
            block.drop_path2 = AdapterAfter(block.drop_path2, adapter)
