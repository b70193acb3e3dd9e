import math

import pytest
import torch

from gist_exp.models.gist import gist_loss
from tiny import GIST_ON, tiny


def images(n=4):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def block_inputs(model, x):
    """The sequence entering each block."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for b in model.vit.blocks]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return seen, out


def test_loss_equals_hand_computation_of_spec_formula():
    torch.manual_seed(0)
    s_cls, s_gist = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])

    def hand(s_cls, s_gist):
        total_ce = total_kl = 0.0
        for row in range(6):
            def softmax(logits, t=1.0):
                e = [math.exp(v / t) for v in logits]
                return [v / sum(e) for v in e]
            pc, pg = softmax(s_cls[row].tolist()), softmax(s_gist[row].tolist())
            total_ce += -math.log(pc[y[row]]) - 0.5 * math.log(pg[y[row]])
            p, q = softmax(s_cls[row].tolist(), 3.0), softmax(s_gist[row].tolist(), 3.0)
            total_kl += sum(a * math.log(a / b) for a, b in zip(p, q)) + sum(b * math.log(b / a) for a, b in zip(p, q))
        return total_ce / 6 + 0.75 * total_kl / 6  # batchmean, no T^2

    assert gist_loss(s_cls, s_gist, y).item() == pytest.approx(hand(s_cls, s_gist), rel=1e-5)
    assert gist_loss(s_cls, s_gist, y, 0.0, 0.0, 3.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(s_cls, y).item(), rel=1e-6)


def test_kl_sends_gradient_to_both_logits():
    s_cls = torch.randn(4, 5, requires_grad=True)
    s_gist = torch.randn(4, 5, requires_grad=True)
    # with both CE terms off only the symmetric KL remains: no stop-gradient on either side
    gist_loss(s_cls, s_gist, torch.zeros(4, dtype=torch.long), ce_weight=0.0).backward()
    assert s_gist.grad.abs().sum() > 0 and s_cls.grad.abs().sum() > 0


def test_gist_token_sits_at_index_1_without_position_embedding():
    torch.manual_seed(0)
    model = tiny(dict(name="adapter", variant="shared_parallel"), GIST_ON).eval()
    x = images()
    (first, _), _ = block_inputs(model, x)
    vit = model.vit
    patches = vit.patch_embed(model.normalize(x))
    assert first.shape[1] == 1 + 1 + patches.shape[1]
    assert torch.equal(first[:, 1], model.gist.token[0].expand(4, -1))  # no position embedding added
    assert torch.equal(first[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[0].expand(4, -1))
    torch.testing.assert_close(first[:, 2:], patches + vit.pos_embed[:, 1:])


def test_shared_head_scores_both_tokens_and_prediction_is_cls():
    torch.manual_seed(0)
    model = tiny(dict(name="linear"), GIST_ON).eval()
    x = images()
    with torch.no_grad():
        tokens = model.tokens(x)
        s_cls, s_gist = model(x)
        assert torch.equal(s_cls, model.vit.head(tokens[:, 0]))
        assert torch.equal(s_gist, model.vit.head(tokens[:, 1]))
        assert torch.equal(model.predict(x), s_cls)
        model.predict_from = "mean"
        assert torch.equal(model.predict(x), (s_cls + s_gist) / 2)


def test_separate_head_is_a_second_independent_head():
    torch.manual_seed(0)
    model = tiny(dict(name="linear"), {**GIST_ON, "head": "separate"}).eval()
    assert model.gist_head is not model.vit.head
    assert not torch.equal(model.gist_head.weight, model.vit.head.weight)
    with torch.no_grad():
        tokens = model.tokens(images())
        _, s_gist = model(images())
    assert torch.equal(s_gist, model.gist_head(tokens[:, 1]))


def test_token_init_and_dropout_per_sample():
    torch.manual_seed(0)
    model = tiny(dict(name="linear"), GIST_ON)
    token = model.gist.token
    assert token.shape == (1, 1, 64) and token.abs().max() <= 0.5 and token.std() > 0.2  # uniform(-0.5, 0.5)
    model.train()
    dropped = model.gist(8)
    assert (dropped == 0).any()
    assert not all(torch.equal(dropped[0], dropped[i]) for i in range(1, 8))  # a mask per sample
    model.eval()
    assert torch.equal(model.gist(2), token.expand(2, -1, -1))


def test_gist_off_is_the_plain_peft_model():
    torch.manual_seed(0)
    model = tiny(dict(name="lora", rank=8, alpha=8, targets=["qkv"])).eval()
    (first, _), (s_cls, s_gist) = block_inputs(model, images())
    assert s_gist is None and model.gist is None
    assert first.shape[1] == 1 + 16
