import copy

import torch

from gist_exp.models.adapter import AdapterAfter, ParallelAdapterBlock
from tiny import tiny


def x_tokens():
    return torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))


def model(variant):
    torch.manual_seed(0)
    return tiny(dict(name="adapter", variant=variant, bottleneck=None, scale=None)).eval()


def test_parallel_adapter_is_added_beside_both_branches():
    block = model("shared_parallel").vit.blocks[0]
    assert isinstance(block, ParallelAdapterBlock)
    x = x_tokens()
    with torch.no_grad():
        # with the up-projection zeroed the block is timm's block exactly
        silent = copy.deepcopy(block)
        silent.adapter.up.weight.zero_(), silent.adapter.up.bias.zero_()
        assert torch.equal(silent(x), block.block(x))
        # with both frozen branches silenced only the adapter acts, twice, on the un-normalised stream
        only = copy.deepcopy(block)
        for layer in (only.block.attn.proj, only.block.mlp.fc2):
            layer.weight.zero_(), layer.bias.zero_()
        a = only.adapter
        expected = x + a(x)
        expected = expected + a(expected)
        torch.testing.assert_close(only(x), expected)
        assert torch.equal(a(x), a.up(torch.nn.functional.gelu(a.down(x))) * 0.1)


def test_sequential_adapter_follows_the_mlp_with_its_own_residual():
    block = model("sequential_mlp").vit.blocks[0]
    assert isinstance(block.drop_path2, AdapterAfter)
    x = x_tokens()
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_(), layer.bias.zero_()
        a = block.drop_path2.adapter
        torch.testing.assert_close(block(x), x + a(torch.zeros_like(x)))


def test_adapter_inits_survive_model_construction():
    """The PEFT modules are built after timm's init_weights and the weight load, so nothing overwrites them."""
    parallel = model("shared_parallel").vit.blocks[0].adapter
    assert parallel.up.bias.abs().max() == 0  # trunc_normal(std 0.02), zero bias; nn.Linear default: std 0.07
    assert 0.015 < parallel.down.weight.std() < 0.025
    sequential = model("sequential_mlp").vit.blocks[0].drop_path2.adapter
    xavier_std = (2 / (64 + 8)) ** 0.5  # xavier_uniform on (8, 64): NOAH's intended init, not timm's 0.02
    assert abs(sequential.down.weight.std() - xavier_std) < 0.25 * xavier_std
    assert 0 < sequential.up.bias.abs().max() < 1e-4  # normal(std=1e-6)


def test_only_peft_gist_and_head_train():
    m = model("shared_parallel")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith("vit.head.") for n in trainable)
