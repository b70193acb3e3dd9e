"""Weights from local files (.pth, .safetensors, Google .npz), and the errors that say how to supply them."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gist_exp.errors import WeightsError
from gist_exp.models.backbone import DropPath, create_backbone
from tiny import BACKBONE

ARGS = BACKBONE["model_args"]


def tiny_vit(weights="random", num_classes=5, **overrides):
    return create_backbone(BACKBONE["name"], str(weights), num_classes, 0.0, {**ARGS, **overrides})


def body(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def assert_same_body(a, b):
    for key, value in body(a).items():
        assert torch.equal(value, body(b)[key]), key


def to_google_npz(model, path):
    """Write a timm ViT in the layout of Google's ViT-B_16.npz (the inverse of timm's npz loader)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": np.zeros((d, 21843), np.float32), "head/bias": np.zeros(21843, np.float32),
         "pre_logits/kernel": np.zeros((d, d), np.float32), "pre_logits/bias": np.zeros(d, np.float32)}
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        m = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for n, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[f"{m}{n}/kernel"] = wt.T.reshape(d, heads, d // heads)
            w[f"{m}{n}/bias"] = bs.reshape(heads, d // heads)
        w[m + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, d // heads, d)
        w[m + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[b + name + ".weight"], sd[b + name + ".bias"]
    np.savez(path, **w)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_local_weight_files_load_and_head_is_recreated(tmp_path, suffix):
    torch.manual_seed(1)
    source = tiny_vit(num_classes=21843)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"model": source.state_dict()}, path)  # wrapped, as training scripts save it
    elif suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        to_google_npz(source, path)
    torch.manual_seed(2)
    loaded = tiny_vit(path, num_classes=47)
    if suffix == ".npz":
        for key, value in body(source).items():
            torch.testing.assert_close(body(loaded)[key], value, rtol=0, atol=1e-6, msg=key)
    else:
        assert_same_body(loaded, source)
    assert loaded.head.weight.shape == (47, 64)


def test_mismatched_state_dict_lists_the_keys(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(tiny_vit(embed_dim=96, num_heads=2).state_dict(), path)
    with pytest.raises(WeightsError) as error:
        tiny_vit(path)
    message = str(error.value)
    assert "does not match" in message and "shape mismatch" in message
    assert "blocks.0.attn.qkv.weight: file (288, 96) vs model (192, 64)" in message


def test_mismatched_npz_lists_the_keys(tmp_path):
    path = tmp_path / "deep.npz"
    to_google_npz(tiny_vit(depth=3), path)
    with pytest.raises(WeightsError, match="more than 2 blocks"):
        tiny_vit(path)
    to_google_npz(tiny_vit(embed_dim=96, num_heads=2), path)
    with pytest.raises(WeightsError, match=r"embedding/kernel: file \(8, 8, 3, 96\) vs model \(8, 8, 3, 64\)"):
        tiny_vit(path)


def test_missing_corrupt_and_unsafe_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*backbone.weights=/path/to/file"):
        tiny_vit(tmp_path / "nope.pth")
    torch.save(tiny_vit().state_dict(), tmp_path / "ok.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "ok.pth").read_bytes()[:2000])
    with pytest.raises(WeightsError, match="cannot be read"):
        tiny_vit(truncated)
    unsafe = tmp_path / "object.pth"
    torch.save({"model": tiny_vit().state_dict(), "extra": object()}, unsafe)
    with pytest.raises(WeightsError, match="refused"):
        tiny_vit(unsafe)
    with pytest.raises(WeightsError, match="unknown file type"):
        (tmp_path / "w.h5").write_bytes(b"x")
        tiny_vit(tmp_path / "w.h5")


def test_hub_without_network_or_cache_says_how_to_supply(tmp_path):
    code = ("from gist_exp.models.backbone import create_backbone\n"
            "create_backbone('vit_base_patch16_224.augreg_in21k', 'hub', 10)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "WeightsError: could not load pretrained weights for backbone 'vit_base_patch16_224.augreg_in21k'" in out.stderr
    assert "backbone.weights=/path/to/file" in out.stderr and str(tmp_path) in out.stderr


def test_drop_path_rates_follow_timms_depth_schedule_and_keep_its_maths():
    model = create_backbone(BACKBONE["name"], "random", 5, 0.2, BACKBONE["model_args"])
    rates = [1 - b.drop_path1.keep.item() for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.2])  # timm: linspace(0, rate, depth), both branches alike
    assert [1 - b.drop_path2.keep.item() for b in model.blocks] == pytest.approx(rates)
    assert all(k.startswith(("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head")) for k in model.state_dict())

    x = torch.randn(4000, 3, 2)
    assert torch.equal(DropPath(0.0).train()(x), x)  # rate 0: exactly the identity while training
    assert torch.equal(DropPath(0.3).eval()(x), x)
    y = DropPath(0.25).train()(x)
    kept = (y != 0).all(dim=(1, 2))
    assert 0.72 < kept.float().mean() < 0.78  # each sample's branch kept with probability 0.75
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
