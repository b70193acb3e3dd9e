"""The patch embedding as a matmul over flattened patches, against timm's convolution; frozen weights in bf16;
the blocks as one nested compile region; inductor's unread graph scripts skipped; the adapters' kernels
launched statically."""

import copy
import io
import logging
import os

import pytest
import torch
from timm.layers import PatchEmbed
from torch import nn

from gist_exp.models import gist_loss
from gist_exp.models.vit import (STATIC_LAUNCH_VARIABLE, PeftViT, compiled_tokens, embed_patches, is_patchify,
                                 skip_unread_graph_scripts)
from tiny import GIST_ON, tiny


def pixels(n=4, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_the_matmul_gives_timms_convolution_output():
    model = tiny(dict(name="linear")).eval()
    patch_embed = model.vit.patch_embed
    assert model.patchify and is_patchify(patch_embed)
    x = pixels()
    with torch.no_grad():
        expected = patch_embed(x)
        torch.testing.assert_close(embed_patches(patch_embed, x), expected, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs: both in bf16
            torch.testing.assert_close(embed_patches(patch_embed, x).float(), expected, rtol=0.02, atol=0.02)


def test_tokens_use_the_matmul_and_do_not_depend_on_which_form_embeds_the_patches():
    model = tiny(dict(name="adapter", variant="shared_parallel")).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    convolutions = []
    model.vit.patch_embed.proj.register_forward_hook(lambda *args: convolutions.append(1))
    with torch.no_grad():
        matmul = model.tokens(images)
        assert not convolutions  # the convolution module never ran
        model.patchify = False
        torch.testing.assert_close(model.tokens(images), matmul, rtol=1e-5, atol=1e-5)
        assert len(convolutions) == 1


@pytest.mark.parametrize("change, plain", [
    (lambda pe: None, True),
    (lambda pe: setattr(pe.proj, "stride", (4, 4)), False),  # overlapping patches
    (lambda pe: setattr(pe.proj, "padding", (1, 1)), False),
    (lambda pe: setattr(pe, "dynamic_img_pad", True), False),
    (lambda pe: setattr(pe, "flatten", False), False),  # NCHW output
])
def test_only_non_overlapping_unpadded_patch_embeddings_become_a_matmul(change, plain):
    patch_embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    change(patch_embed)
    assert is_patchify(patch_embed) is plain


def test_a_wrong_image_size_gets_timms_error():
    model = tiny(dict(name="linear")).eval()
    with pytest.raises(AssertionError, match=r"Input height \(40\) doesn't match model \(32\)"):
        model.tokens(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))


def test_full_fine_tuning_trains_the_patch_weight_through_the_matmul_as_through_the_convolution():
    model = tiny(dict(name="full")).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    grads = []
    for patchify in (True, False):
        model.zero_grad()
        model.patchify = patchify
        model(images)[0].square().sum().backward()
        grads.append(model.vit.patch_embed.proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


PEFTS = [dict(name="adapter", variant="shared_parallel"), dict(name="lora", rank=4, alpha=4, targets=["qkv"]),
         dict(name="vpt", num_prompts=3, mode="deep", dropout=0.1)]


@pytest.mark.parametrize("peft", PEFTS)
def test_frozen_weights_stored_in_bf16_give_the_same_bits_under_autocast(peft):
    """What autocast computes does not change: it casts the frozen fp32 weights to bf16 before every matmul."""
    torch.manual_seed(0)
    plain = tiny(peft, GIST_ON)
    stored = copy.deepcopy(plain)
    stored.store_frozen_weights_in(torch.bfloat16)
    cast = 0
    for module in stored.modules():  # frozen Linear / Conv2d parameters in bf16, everything else fp32
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for param in module.parameters(recurse=False):
                assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16)
                cast += not param.requires_grad
    assert cast == 4 * 2 * 2 + 2  # qkv, proj, fc1, fc2 of both blocks and the patch embedding, weight and bias
    assert stored.vit.pos_embed.dtype == stored.vit.norm.weight.dtype == stored.gist.token.dtype == torch.float32

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    outputs = []
    for model in (plain, stored):
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cls_logits, gist_logits = model(images)
            loss = gist_loss(cls_logits, gist_logits, labels, 0.5, 0.75, 3.0)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outputs.append((cls_logits, gist_logits, grads))
    (cls_a, gist_a, grads_a), (cls_b, gist_b, grads_b) = outputs
    assert torch.equal(cls_a, cls_b) and torch.equal(gist_a, gist_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def traced_block_calls(model, images) -> list:
    """Compile `PeftViT.tokens` as compile_tokens sets it up; return the nested-region calls in dynamo's graph.
    In eval mode (no random draws) also check the compiled tokens against the eager ones."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model.compile_tokens()
    tokens = torch.compile(PeftViT.tokens, backend=capture, dynamic=False)(model, images)
    if not model.training:
        torch.testing.assert_close(tokens, PeftViT.tokens(model, images), rtol=1e-5, atol=1e-5)
    (graph,) = graphs
    return [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]


@pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"), reason="torch without nested compile regions")
@pytest.mark.parametrize("peft", PEFTS)
def test_under_compile_every_block_runs_one_shared_region(peft):
    """Dynamo traces the first block once and the others call the same subgraph (the cold compile's saving),
    drop-path rates included: they differ per block as tensors, not as constants baked into the trace."""
    model = tiny(peft, GIST_ON, drop_path_rate=0.2).train()  # the training graph, drop-path drawn
    calls = traced_block_calls(model, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert len(calls) == len(model.vit.blocks) == 2
    assert len({node.args[0].target for node in calls}) == 1


@pytest.mark.parametrize("change", [lambda block: setattr(block, "ls2", nn.Tanh()),
                                    lambda block: setattr(block.attn, "scale", 1.0),
                                    lambda block: block.register_forward_hook(lambda module, args, out: out * 2)])
def test_blocks_that_differ_are_compiled_each_as_it_is(change):
    """A nested region would run the first block's code for every block: a block with another module, setting
    or hook must not share it (e.g. adapters in the last blocks only)."""
    model = tiny(dict(name="lora", rank=4, alpha=4, targets=["qkv"]), GIST_ON).eval()
    change(model.vit.blocks[1])
    assert traced_block_calls(model, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)) == []


def test_inductor_writes_no_graph_script_unless_a_trace_listens_and_other_callers_still_get_one(monkeypatch):
    from torch._dynamo.repro import after_aot
    from torch._logging._internal import LazyTraceHandler, trace_log

    # As in a run without TORCH_TRACE: only torch's own lazy handler (pytest adds its capture handlers).
    monkeypatch.setattr(trace_log, "handlers", [h for h in trace_log.handlers if isinstance(h, LazyTraceHandler)])
    skip_unread_graph_scripts()
    skip_unread_graph_scripts()  # a second call does not wrap twice
    assert not hasattr(after_aot.save_graph_repro.__wrapped__, "__wrapped__")
    graph = torch.fx.symbolic_trace(nn.Linear(2, 2))
    inputs = [torch.randn(1, 2)]

    def script_from(module_name: str) -> str:  # save_graph_repro called from code in `module_name`
        out = io.StringIO()
        scope = {"__name__": module_name, "after_aot": after_aot, "out": out, "graph": graph, "inputs": inputs}
        exec("after_aot.save_graph_repro(out, graph, inputs, 'inductor', save_dir=None)", scope)
        return out.getvalue()

    assert script_from("torch._inductor.compile_fx") == ""
    assert "def forward" in script_from("my_minifier")
    assert "def forward" in after_aot.generate_standalone_repro(graph, inputs)
    listener = logging.NullHandler()
    trace_log.addHandler(listener)
    try:
        assert "def forward" in script_from("torch._inductor.compile_fx")
    finally:
        trace_log.removeHandler(listener)


def test_compiling_the_token_pipeline_installs_the_graph_script_skip(monkeypatch):
    from torch._dynamo.repro import after_aot

    unwrapped = getattr(after_aot.save_graph_repro, "__wrapped__", after_aot.save_graph_repro)
    monkeypatch.setattr(after_aot, "save_graph_repro", unwrapped)
    compiled_tokens.__wrapped__("default")  # past the per-process cache; torch.compile itself is lazy
    assert getattr(after_aot.save_graph_repro, "skips_unread", False)


def test_compiling_the_token_pipeline_launches_the_adapter_kernels_statically_unless_the_user_chose(monkeypatch):
    """Inductor's static launcher takes the user-written kernels too, in this process and in the compile workers
    (which read the environment); a value the user put in the environment is left as it is."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
        pytest.skip("this torch has no static launch of user-written Triton kernels")
    monkeypatch.setattr(inductor_config, "static_launch_user_defined_triton_kernels", False)
    monkeypatch.setenv(STATIC_LAUNCH_VARIABLE, "0")
    compiled_tokens.__wrapped__("default")
    assert inductor_config.static_launch_user_defined_triton_kernels is False  # the user's choice

    monkeypatch.delenv(STATIC_LAUNCH_VARIABLE)
    compiled_tokens.__wrapped__("default")
    assert inductor_config.static_launch_user_defined_triton_kernels is True
    assert os.environ[STATIC_LAUNCH_VARIABLE] == "1"
