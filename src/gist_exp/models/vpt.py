"""Visual Prompt Tuning (Jia et al., 2022): learnable prompt tokens after CLS (and after GIST), no position embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


class Prompts(nn.Module):
    """`deep`: a fresh set of prompts for every block (block i >= 1 replaces the previous block's prompt
    outputs); shallow: one set inserted before block 0 that flows through all blocks."""

    def __init__(self, num_prompts: int, dim: int, depth: int, deep: bool = True, dropout: float = 0.1,
                 patch_size: int = 16):
        super().__init__()
        self.num_prompts = num_prompts
        self.deep = deep
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))  # VPT's init (xavier over a patch)
        layers = depth if deep else 1
        self.embeddings = nn.Parameter(torch.empty(layers, num_prompts, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, layer: int, batch_size: int) -> torch.Tensor:
        return self.dropout(self.embeddings[layer].expand(batch_size, -1, -1))
