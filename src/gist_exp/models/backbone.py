"""The frozen backbone: a timm VisionTransformer by name, with weights from the hub cache, a local file, or none.

Weight files load without unpickling arbitrary objects: `.npz` with allow_pickle=False (Google's
format, e.g. `ViT-B_16.npz`), `.pth` / `.pt` / `.bin` with `torch.load(weights_only=True)`, and
`.safetensors`. The classifier head is always re-created for the task's class count.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..errors import WeightsError

MAX_LISTED_KEYS = 20
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def how_to_supply(name: str) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    return (
        f"To supply weights for {name}: either fill timm's cache on a machine with network "
        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), then copy {cache} here "
        f"(or point HF_HOME at it); or download the checkpoint file and pass backbone.weights=/path/to/file "
        f"(.npz in Google's format such as ViT-B_16.npz, .safetensors, or a .pth/.bin state dict). "
        f"backbone.weights=random builds the model without pretrained weights."
    )


def create_backbone(name: str, weights: str = "hub", num_classes: int = 1000, drop_path_rate: float = 0.0,
                    model_args: dict | None = None) -> VisionTransformer:
    """Build timm model `name`; `weights` is 'hub', 'random' or a path to a weights file."""
    model_args = dict(model_args or {})
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **model_args)
    if weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # network, missing cache entry, unknown pretrained tag...
            raise WeightsError(
                f"could not load pretrained weights for backbone '{name}' from the Hugging Face hub or its "
                f"local cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {how_to_supply(name)}"
            ) from None
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights != "random":
            load_weights_file(model, Path(weights).expanduser(), name)
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f"backbone '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    for block in model.blocks:
        for attr in ("drop_path1", "drop_path2"):
            setattr(block, attr, DropPath(getattr(getattr(block, attr), "drop_prob", 0.0)))
    return model


class DropPath(nn.Module):
    """timm's stochastic depth (keep each sample's branch with probability 1 - rate, scaled by
    1 / (1 - rate)), with the rate in a buffer instead of a Python constant: torch.compile then traces
    one graph for every rate, so the tasks of a sweep (rates 0, 0.1, 0.2) share compiled code.
    At rate 0 it is exactly the identity."""

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate {rate} must be in [0, 1)")
        self.register_buffer("keep", torch.tensor(1.0 - rate), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        kept = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < self.keep
        return x * (kept.to(x.dtype) / self.keep)

    def extra_repr(self) -> str:
        return f"rate={1 - self.keep.item():.3g}"


def load_weights_file(model: VisionTransformer, path: Path, name: str) -> None:
    if not path.is_file():
        raise WeightsError(f"backbone.weights file '{path}' does not exist. {how_to_supply(name)}")
    if path.suffix == ".npz":
        load_npz(model, path)
        return
    state_dict = read_state_dict(path)
    state_dict = checkpoint_filter_fn(state_dict, model)  # timm: resizes pos_embed, converts other layouts
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=False)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        elif path.suffix in STATE_DICT_SUFFIXES:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"backbone.weights '{path}': unknown file type '{path.suffix}'; use .npz, .safetensors, "
                f"or a state dict saved as {', '.join(STATE_DICT_SUFFIXES)}")
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"backbone.weights '{path}' holds more than tensors and is refused (weights_only=True; "
            f"{str(e).splitlines()[0]}). Save a plain state dict: torch.save(model.state_dict(), path)") from None
    except Exception as e:  # torch and safetensors raise many types for damaged files
        raise WeightsError(f"backbone.weights '{path}' cannot be read (corrupt or truncated?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for key in ("state_dict", "model", "module"):  # unwrap common training-checkpoint layouts
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"backbone.weights '{path}' is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def check_state_dict(model: VisionTransformer, state_dict: dict, path: Path) -> None:
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    )
    problems = []
    for title, keys in (("shape mismatch", mismatched), ("missing in file", missing), ("not in model", unexpected)):
        if keys:
            shown = ", ".join(keys[:MAX_LISTED_KEYS]) + (f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED_KEYS else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise WeightsError(
            f"backbone.weights '{path}' does not match backbone '{model.default_cfg.get('architecture', '?')}' "
            f"({len(model.blocks)} blocks, width {model.embed_dim}):\n  " + "\n  ".join(problems)
            + "\nPass weights of the same architecture, or choose the matching backbone=...")


def load_npz(model: VisionTransformer, path: Path) -> None:
    """Google's ViT .npz: checked key by key against the model, then loaded by timm's converter."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes = {k: archive[k].shape for k in archive.files}
    except Exception as e:
        raise WeightsError(f"backbone.weights '{path}' cannot be read as .npz (corrupt or truncated?): "
                           f"{type(e).__name__}: {e}") from None
    prefix = "opt/target/" if "opt/target/embedding/kernel" in shapes else ""
    patch = model.patch_embed.proj.weight.shape  # (D, 3, p, p); Google stores (p, p, 3, D)
    expected = {
        "embedding/kernel": (patch[2], patch[3], patch[1], patch[0]),
        "cls": (1, 1, model.embed_dim),
        "Transformer/encoder_norm/scale": (model.embed_dim,),
    }
    expected.update({f"Transformer/encoderblock_{i}/LayerNorm_0/scale": (model.embed_dim,)
                     for i in range(len(model.blocks))})
    problems = [f"missing {k}" for k in expected if prefix + k not in shapes]
    problems += [f"{k}: file {shapes[prefix + k]} vs model {shape}" for k, shape in expected.items()
                 if prefix + k in shapes and tuple(shapes[prefix + k]) != shape]
    extra_blocks = [k for k in shapes if k.startswith(f"{prefix}Transformer/encoderblock_{len(model.blocks)}/")]
    if extra_blocks:
        problems.append(f"file has more than {len(model.blocks)} blocks (e.g. {extra_blocks[0]})")
    if problems:
        raise WeightsError(
            f"backbone.weights '{path}' does not match the backbone ({len(model.blocks)} blocks, width "
            f"{model.embed_dim}):\n  " + "\n  ".join(problems[:MAX_LISTED_KEYS])
            + "\nPass weights of the same architecture, or choose the matching backbone=...")
    try:
        model.load_pretrained(str(path))
    except Exception as e:
        raise WeightsError(f"backbone.weights '{path}': loading failed ({type(e).__name__}: {e})") from None
