import pytest
import torch

from gist_exp.models.lora import LoRAQKV
from tiny import tiny

LORA = dict(name="lora", rank=8, alpha=8, targets=["qkv"])


def images(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", [["qkv"], ["q", "v"]])
def test_lora_at_init_reproduces_the_frozen_backbone_exactly(targets):
    torch.manual_seed(0)
    model = tiny({**LORA, "targets": targets}).eval()
    model.patchify = False  # timm's patch convolution on both sides (the matmul form differs by rounding)
    x = images()
    with torch.no_grad():
        plain = model.vit(model.normalize(x))  # timm's own forward, on the wrapped qkv's frozen base
        lora, _ = model(x)
        for block in model.vit.blocks:  # the same model with every LoRA module removed
            block.attn.qkv = block.attn.qkv.qkv
        base = model.vit(model.normalize(x))
    assert torch.equal(lora, plain)
    assert torch.equal(lora, base)


def test_lora_delta_is_scaled_low_rank_update_on_chosen_parts():
    torch.manual_seed(0)
    qkv = torch.nn.Linear(16, 48)
    lora = LoRAQKV(qkv, rank=4, alpha=8, targets=("q", "v"))
    for t in ("q", "v"):
        torch.nn.init.normal_(lora.lora_b[t].weight)
    x = torch.randn(3, 5, 16)
    out = lora(x)
    q, k, v = qkv(x).chunk(3, dim=-1)
    delta = {t: (x @ lora.lora_a[t].weight.T @ lora.lora_b[t].weight.T) * 2.0 for t in ("q", "v")}
    torch.testing.assert_close(out, torch.cat([q + delta["q"], k, v + delta["v"]], dim=-1))


def test_lora_matches_hf_peft_on_the_same_timm_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tiny(LORA).eval()
    for block in model.vit.blocks:  # a non-trivial update to compare
        torch.nn.init.normal_(block.attn.qkv.lora_b["qkv"].weight, std=0.1)
    x = images()
    with torch.no_grad():
        ours, _ = model(x)

    reference = tiny(dict(name="linear")).eval()
    reference.vit.load_state_dict(
        {k.replace(".qkv.qkv.", ".qkv."): v for k, v in model.vit.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        frozen = reference.vit(reference.normalize(x))
    config = peft.LoraConfig(target_modules=["qkv"], r=8, lora_alpha=8, lora_dropout=0.0)
    hf = peft.inject_adapter_in_model(config, reference.vit)
    with torch.no_grad():
        for ours_block, hf_block in zip(model.vit.blocks, hf.blocks):
            hf_block.attn.qkv.lora_A["default"].weight.copy_(ours_block.attn.qkv.lora_a["qkv"].weight)
            hf_block.attn.qkv.lora_B["default"].weight.copy_(ours_block.attn.qkv.lora_b["qkv"].weight)
        theirs = hf(reference.normalize(x))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - frozen).abs().max() > 1e-2  # the compared update is far from zero


def test_lora_init_kaiming_a_and_zero_b():
    lora = LoRAQKV(torch.nn.Linear(64, 192), rank=8, alpha=8)
    assert torch.count_nonzero(lora.lora_b["qkv"].weight) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    a = lora.lora_a["qkv"].weight
    assert a.abs().max() <= bound and a.std() > bound / 3
