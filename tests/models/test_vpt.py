import torch

from test_gist import block_inputs, images
from tiny import GIST_ON, tiny


def vpt(mode, gist=GIST_ON, prompts=3):
    torch.manual_seed(0)
    return tiny(dict(name="vpt", num_prompts=prompts, mode=mode, dropout=0.1), gist).eval()


def test_deep_prompts_follow_gist_and_are_replaced_in_every_block():
    model = vpt("deep")
    inputs, _ = block_inputs(model, images())
    assert model.prompts.embeddings.shape == (2, 3, 64)
    for i, seq in enumerate(inputs):
        assert seq.shape[1] == 1 + 1 + 3 + 16  # [CLS, GIST, prompts, patches]
        assert torch.equal(seq[:, 2:5], model.prompts.embeddings[i].expand(4, -1, -1))


def test_shallow_prompts_are_inserted_once_and_kept_to_the_last_block():
    model = vpt("shallow")
    inputs, _ = block_inputs(model, images())
    assert model.prompts.embeddings.shape == (1, 3, 64)
    assert torch.equal(inputs[0][:, 2:5], model.prompts.embeddings[0].expand(4, -1, -1))
    with torch.no_grad():
        after_block0 = model.vit.blocks[0](inputs[0])
    assert torch.equal(inputs[1], after_block0)  # block 1 sees block 0's prompt outputs, not new prompts
    with torch.no_grad():
        assert model.tokens(images()).shape[1] == 1 + 1 + 3 + 16  # prompts are still there after the last block


def test_prompts_directly_after_cls_without_gist():
    model = vpt("deep", gist=dict(enabled=False))
    inputs, _ = block_inputs(model, images())
    assert torch.equal(inputs[1][:, 1:4], model.prompts.embeddings[1].expand(4, -1, -1))


def test_vpt_init_bound():
    model = vpt("deep")
    bound = (6 / (3 * 8 * 8 + 64)) ** 0.5  # patch 8, width 64 for the tiny ViT
    assert model.prompts.embeddings.abs().max() <= bound
    assert model.prompts.embeddings.abs().max() > 0.9 * bound
