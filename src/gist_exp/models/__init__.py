"""Model assembly: backbone -> freeze -> PEFT modules (built after timm's init and the weight load) -> GIST."""

from __future__ import annotations

from torch import nn
from timm.layers import trunc_normal_

from ..errors import ConfigError
from .adapter import VARIANTS, add_adapters
from .backbone import create_backbone
from .gist import GistToken, gist_loss
from .lora import add_lora
from .vit import NORMALIZATIONS, PeftViT
from .vpt import Prompts

PEFT_METHODS = ("adapter", "lora", "vpt", "linear", "full")
HEAD_PREFIXES = ("vit.head.", "gist_head.")

__all__ = ["PEFT_METHODS", "PeftViT", "build_model", "count_parameters", "gist_loss"]


def build_model(backbone: dict, peft: dict, gist: dict, num_classes: int, drop_path_rate: float = 0.0,
                normalization: str = "0.5") -> PeftViT:
    method = peft["name"]
    if method not in PEFT_METHODS:
        raise ConfigError(f"peft={method!r} is not one of {PEFT_METHODS}")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization={normalization!r} is not one of {sorted(NORMALIZATIONS)}")
    vit = create_backbone(backbone["name"], str(backbone["weights"]), num_classes, drop_path_rate,
                          backbone.get("model_args"))
    vit.requires_grad_(method == "full")
    vit.head.requires_grad_(True)

    prompts = None
    if method == "adapter":
        if peft["variant"] not in VARIANTS:
            raise ConfigError(f"peft.variant={peft['variant']!r} is not one of {sorted(VARIANTS)}")
        add_adapters(vit, peft["variant"], peft.get("bottleneck"), peft.get("scale"), peft.get("kernels", True))
    elif method == "lora":
        add_lora(vit, peft["rank"], peft["alpha"], tuple(peft["targets"]))
    elif method == "vpt":
        if peft["mode"] not in ("deep", "shallow"):
            raise ConfigError(f"peft.mode={peft['mode']!r} is not one of deep, shallow")
        prompts = Prompts(peft["num_prompts"], vit.embed_dim, len(vit.blocks), peft["mode"] == "deep",
                          peft["dropout"], vit.patch_embed.patch_size[0])

    gist_token = gist_head = None
    if gist["enabled"]:
        if gist["head"] not in ("shared", "separate"):
            raise ConfigError(f"gist.head={gist['head']!r} is not one of shared, separate")
        gist_token = GistToken(vit.embed_dim, gist["init_range"], gist["dropout"])
        if gist["head"] == "separate":
            gist_head = nn.Linear(vit.embed_dim, num_classes)
            trunc_normal_(gist_head.weight, std=0.02)  # as timm initialises the CLS head
            nn.init.zeros_(gist_head.bias)
    predict = gist["predict"] if gist["enabled"] else "cls"
    return PeftViT(vit, normalization, gist_token, prompts, gist_head, predict)


def count_parameters(model: PeftViT) -> dict[str, int]:
    """The papers' convention is `trainable_excl_head`; `trainable_total` adds the head(s)."""
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    head = sum(k for n, k in trainable if n.startswith(HEAD_PREFIXES))
    gist = sum(p.numel() for p in model.gist.parameters()) if model.gist is not None else 0
    total = sum(k for _, k in trainable)
    return {
        "gist": gist,
        "peft": total - head - gist,
        "head": head,
        "trainable_excl_head": total - head,
        "trainable_total": total,
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }
