"""LoRA (Hu et al., 2022) on the fused qkv projection of timm's attention.

`targets=("qkv",)` (default, NOAH and HF peft convention): one pair A (r x D), B (3D x r) on the fused
projection, a delta to q, k and v. A subset of ("q", "k", "v") gives each target its own pair.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

PARTS = ("q", "k", "v")


class LoRAQKV(nn.Module):
    """qkv(x) + (alpha / r) * B A x, with B = 0 at init so step 0 is the frozen backbone exactly."""

    def __init__(self, qkv: nn.Linear, rank: int = 8, alpha: float = 8, targets=("qkv",)):
        super().__init__()
        targets = tuple(targets)
        if targets != ("qkv",) and not (targets and set(targets) <= set(PARTS)):
            raise ValueError(f"LoRA targets must be [qkv] or a subset of {list(PARTS)}, got {list(targets)}")
        self.qkv = qkv
        self.scale = alpha / rank
        self.targets = targets
        width = qkv.out_features if targets == ("qkv",) else qkv.out_features // 3
        self.lora_a = nn.ModuleDict({t: nn.Linear(qkv.in_features, rank, bias=False) for t in targets})
        self.lora_b = nn.ModuleDict({t: nn.Linear(rank, width, bias=False) for t in targets})
        for t in targets:
            nn.init.kaiming_uniform_(self.lora_a[t].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b[t].weight)

    def delta(self, x: torch.Tensor, target: str) -> torch.Tensor:
        return self.lora_b[target](self.lora_a[target](x)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        if self.targets == ("qkv",):
            return out + self.delta(x, "qkv")
        parts = out.chunk(3, dim=-1)
        return torch.cat([p + self.delta(x, t) if t in self.targets else p for p, t in zip(parts, PARTS)], dim=-1)


def add_lora(vit: VisionTransformer, rank: int = 8, alpha: float = 8, targets=("qkv",)) -> None:
    """Wrap every block's attention qkv projection, in place."""
    for block in vit.blocks:
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank, alpha, targets)
