"""GIST (Ruan et al., ACM MM 2024): a trainable Gist token beside CLS and the knowledge-interaction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GistToken(nn.Module):
    """One learnable token, inserted once at sequence index 1 after the position embedding (so it has none)."""

    def __init__(self, dim: int, init_range: float = 0.5, dropout: float = 0.1):
        super().__init__()
        self.token = nn.Parameter(torch.empty(1, 1, dim).uniform_(-init_range, init_range))
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch_size: int) -> torch.Tensor:
        # dropout after expand: every sample gets its own mask, as in the official code
        return self.dropout(self.token.expand(batch_size, -1, -1))


def gist_loss(
    cls_logits: torch.Tensor,
    gist_logits: torch.Tensor,
    labels: torch.Tensor,
    ce_weight: float = 0.5,
    kl_weight: float = 0.75,
    temperature: float = 3.0,
) -> torch.Tensor:
    """CE(S_cls, y) + ce_weight * CE(S_gist, y) + kl_weight * [KL(p || q) + KL(q || p)],
    p = softmax(S_cls / T), q = softmax(S_gist / T); batchmean KL, no T^2 factor, gradients flow to both sides."""
    log_p = F.log_softmax(cls_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(gist_logits.float() / temperature, dim=-1)
    kl_pq = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)  # KL(p || q)
    kl_qp = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)  # KL(q || p)
    return (
        F.cross_entropy(cls_logits.float(), labels)
        + ce_weight * F.cross_entropy(gist_logits.float(), labels)
        + kl_weight * (kl_pq + kl_qp)
    )
