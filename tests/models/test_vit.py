"""The patch embedding as a matmul over flattened patches, against timm's convolution; frozen weights in bf16;
the blocks compiled regionally; inductor's unread graph scripts skipped; the adapters' kernels
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
from gist_exp.models.vit import (STATIC_LAUNCH_VARIABLE, compiled_parts, embed_patches, is_patchify,
                                 skip_unread_graph_scripts)
from torch._dynamo.utils import counters
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


def compiled_graphs(model, images) -> int:
    """Run `model`'s compiled training forward and backward (compile_tokens as the library sets it up on the CPU);
    return how many graphs dynamo compiled. In eval mode (no random draws) also check the compiled tokens and
    gradients against the eager ones."""
    torch._dynamo.reset()
    counters.clear()
    model.compile_tokens()
    outputs = []
    for compiled in (True, False):
        model.zero_grad(set_to_none=True)
        tokens = model.tokens(images, compiled=compiled)
        tokens.square().mean().backward()
        outputs.append([tokens] + [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None])
    if not model.training:
        assert len(outputs[0]) == len(outputs[1]) > 1
        for got, expected in zip(*outputs):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("peft", PEFTS)
def test_under_compile_dynamo_traces_one_block_and_every_block_runs_its_graph(peft):
    """Regional compilation: two graphs (the embedding and one block), whatever the depth; drop-path rates
    included, since they differ per block as tensors, not as constants baked into the trace."""
    model = tiny(peft, GIST_ON, drop_path_rate=0.2).train()  # the training graph, drop-path drawn
    assert len(model.vit.blocks) == 2
    assert compiled_graphs(model, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)) == 2


@pytest.mark.parametrize("change", [lambda block: setattr(block, "ls2", nn.Tanh()),
                                    lambda block: setattr(block.attn, "scale", 1.0),
                                    lambda block: block.register_forward_hook(lambda module, args, out: out * 2)])
def test_a_block_that_differs_computes_under_compile_what_it_computes_eagerly(change):
    """A block with another module, setting or hook (e.g. adapters in the last blocks only) must not run the
    first block's code: dynamo's guards see the difference (compiled_graphs compares with eager)."""
    model = tiny(dict(name="lora", rank=4, alpha=4, targets=["qkv"]), GIST_ON).eval()
    change(model.vit.blocks[1])
    assert compiled_graphs(model, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)) >= 2


@pytest.mark.parametrize("peft", PEFTS)
def test_the_cuda_graph_capture_differentiates_through_every_trainable_parameter_but_the_heads(peft, monkeypatch):
    """On a GPU, compile=true captures the compiled pipeline's forward and backward (`capture_tokens`). Here torch's
    capture is a stand-in that checks what it is given and then runs the pipeline as it is. Each trainable
    parameter outside the heads must be an argument that reaches the output (else the captured backward would
    silently leave its gradient out), autocast's cache is off (as torch's capture requires), one capture serves
    each mode, and the gradients are the eager model's."""
    captures = []

    def capture(run, sample, allow_unused_input):
        assert not torch.is_autocast_cache_enabled()
        images, *params = sample
        grads = torch.autograd.grad(run(*sample).square().sum(), params, allow_unused=True)
        captures.append((params, grads))
        return run

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    torch.manual_seed(0)
    model = tiny(peft, GIST_ON).eval()  # eval: no dropout, so compiled and eager draw alike
    eager = copy.deepcopy(model)
    model.compile_tokens("cuda-graphs")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    grads = []
    for m in (model, model, eager):
        m.zero_grad(set_to_none=True)
        cls_logits, gist_logits = m(images)
        (cls_logits.square().sum() + gist_logits.sum()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    (params, param_grads), = captures  # one capture for both calls in eval mode
    pipeline = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("vit.head.", "gist_head."))]
    assert len(params) == len(pipeline) > 0 and all(a is p for a, p in zip(params, pipeline))
    assert all(g is not None for g in param_grads)
    for name, grad in grads[2].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.train()(images)
    assert len(captures) == 2 and len(model.cuda_graphs) == 2  # training mode: a capture of its own


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="'max-autotune' is not one of"):
        tiny(dict(name="linear")).compile_tokens("max-autotune")


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
    compiled_parts.__wrapped__()  # past the per-process cache; torch.compile itself is lazy
    assert getattr(after_aot.save_graph_repro, "skips_unread", False)


def test_compiling_the_token_pipeline_launches_the_adapter_kernels_statically_unless_the_user_chose(monkeypatch):
    """Inductor's static launcher takes the user-written kernels too, in this process and in the compile workers
    (which read the environment); a value the user put in the environment is left as it is."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
        pytest.skip("this torch has no static launch of user-written Triton kernels")
    monkeypatch.setattr(inductor_config, "static_launch_user_defined_triton_kernels", False)
    monkeypatch.setenv(STATIC_LAUNCH_VARIABLE, "0")
    compiled_parts.__wrapped__()
    assert inductor_config.static_launch_user_defined_triton_kernels is False  # the user's choice

    monkeypatch.delenv(STATIC_LAUNCH_VARIABLE)
    compiled_parts.__wrapped__()
    assert inductor_config.static_launch_user_defined_triton_kernels is True
    assert os.environ[STATIC_LAUNCH_VARIABLE] == "1"
