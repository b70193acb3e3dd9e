"""The classifier: a timm VisionTransformer run on the sequence [CLS, GIST, prompts, patches]."""

from __future__ import annotations

import functools
import itertools
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from .gist import GistToken
from .vpt import Prompts

NORMALIZATIONS = {
    "0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # GIST / SSF recipe
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # NOAH Adapter / LoRA
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # PETL_Vision: ToTensor only
}


def call_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


# Under torch.compile, blocks that are alike (`blocks_alike`) are one nested compile region: dynamo and inductor
# compile the first block's forward and backward, and the other blocks (other weights) reuse that code within the
# one graph instead of being traced and compiled twelve times over (benchmarks/RESULTS.md has what a cold compile
# then costs). Eager runs, and torch versions without it, just call the block.
run_block = call_block
if hasattr(torch.compiler, "nested_compile_region"):
    run_block = torch.compiler.nested_compile_region(call_block)


def block_signature(block: nn.Module) -> tuple:
    """What a traced block's code depends on: each submodule's type, plain settings (scales, rates, head counts)
    and hooks, and each parameter's and buffer's shape, dtype and requires_grad."""
    signature = []
    for name, module in block.named_modules():
        settings = sorted((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, type(None))))
        hooks = len(module._forward_pre_hooks), len(module._forward_hooks)
        signature.append((name, type(module), tuple(settings), hooks))
    for name, tensor in itertools.chain(block.named_parameters(), block.named_buffers()):
        signature.append((name, tuple(tensor.shape), tensor.dtype, tensor.requires_grad))
    return tuple(signature)


def blocks_alike(blocks: nn.Sequential) -> bool:
    """Whether every block may run the first one's compiled code. A nested compile region does not check this
    itself: a block with other modules or settings would silently run the first block's code."""
    first = block_signature(blocks[0])
    return all(block_signature(block) == first for block in blocks[1:])


class PixelNormalize(nn.Module):
    """uint8 (B, 3, H, W) -> ToTensor + Normalize, on whatever device the batch is on."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div(255).sub(self.mean).div(self.std)


def is_patchify(patch_embed: nn.Module) -> bool:
    """True for timm's usual patch embedding: a convolution whose stride is its kernel, no padding."""
    if type(patch_embed) is not PatchEmbed or not patch_embed.flatten or patch_embed.dynamic_img_pad:
        return False
    proj = patch_embed.proj
    return (type(proj) is nn.Conv2d and proj.stride == proj.kernel_size and proj.padding == (0, 0)
            and proj.dilation == (1, 1) and proj.groups == 1)


def embed_patches(patch_embed: PatchEmbed, images: torch.Tensor) -> torch.Tensor:
    """`patch_embed(images)` as one matmul over the flattened patches, which is what a convolution with
    stride = kernel computes. On an H200, cuDNN's bf16 kernel for ViT-B/16's patch convolution took
    0.38 ms per batch of 64, plus layout copies; as a matmul the training step is 0.6-0.8 ms faster
    (benchmarks/RESULTS.md)."""
    proj = patch_embed.proj
    (ph, pw), (b, c, h, w) = proj.kernel_size, images.shape
    strict = patch_embed.img_size is not None and patch_embed.strict_img_size
    if h % ph or w % pw or (strict and (h, w) != tuple(patch_embed.img_size)):
        return patch_embed(images)  # timm's own error message
    patches = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    x = F.linear(patches.reshape(b, (h // ph) * (w // pw), c * ph * pw),
                 proj.weight.reshape(proj.out_channels, -1), proj.bias)
    return patch_embed.norm(x)


class PeftViT(nn.Module):
    """Input: uint8 images. Output: (CLS logits, Gist logits or None), both from the final LayerNorm.

    The Gist token (index 1) and the VPT prompts (after it) are inserted after the position embedding,
    so neither gets one; every token attends to every other one in every block.
    """

    def __init__(self, vit: VisionTransformer, normalization: str = "0.5", gist: GistToken | None = None,
                 prompts: Prompts | None = None, gist_head: nn.Linear | None = None, predict: str = "cls"):
        super().__init__()
        if vit.global_pool != "token" or vit.num_prefix_tokens != 1:
            raise ValueError("PeftViT needs a ViT with one class token and token pooling")
        if predict not in ("cls", "gist", "mean") or (predict != "cls" and gist is None):
            raise ValueError(f"predict={predict!r} needs one of cls|gist|mean, and gist|mean need the Gist token")
        self.normalize = PixelNormalize(*NORMALIZATIONS[normalization])
        self.vit = vit
        self.gist = gist
        self.prompts = prompts
        self.gist_head = gist_head  # None: the Gist token shares the CLS head (official code)
        self.predict_from = predict
        self.compile_mode: str | None = None  # set by compile_tokens
        self.blocks_share_code = False  # set by compile_tokens
        self.patchify = is_patchify(vit.patch_embed)

    @property
    def prompt_start(self) -> int:
        return 1 + (self.gist is not None)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        pixels = self.normalize(images)
        x = embed_patches(vit.patch_embed, pixels) if self.patchify else vit.patch_embed(pixels)
        x = vit._pos_embed(x)  # [CLS, patches] + position embedding
        x = vit.norm_pre(vit.patch_drop(x))
        batch = x.shape[0]
        inserted = [self.gist(batch)] if self.gist is not None else []
        if self.prompts is not None:
            inserted.append(self.prompts(0, batch))
        if inserted:
            x = torch.cat([x[:, :1], *inserted, x[:, 1:]], dim=1)
        start = self.prompt_start
        call = run_block if self.blocks_share_code else call_block
        for i, block in enumerate(vit.blocks):
            if self.prompts is not None and self.prompts.deep and i > 0:
                end = start + self.prompts.num_prompts
                x = torch.cat([x[:, :start], self.prompts(i, batch), x[:, end:]], dim=1)
            x = call(block, x)
        return vit.norm(x)

    def compile_tokens(self, mode: str = "default") -> None:
        """torch.compile the token pipeline for training (parameters, hence checkpoint keys, unchanged).
        The heads and the loss stay eager: their shapes depend on the task's class count, and leaving
        them out lets every task of a sweep reuse the same compiled graphs. Static shapes: an odd batch
        size would compile another graph, so the training loader keeps batches at one size.
        Evaluation (autograd off) runs the eager pipeline: an inference graph takes longer to compile
        than it saves on VTAB test sets (benchmarks/RESULTS.md). The blocks share one compiled region when
        they are alike now; a later change to one block's modules needs another call."""
        self.compile_mode = mode
        self.blocks_share_code = blocks_alike(self.vit.blocks)

    def store_frozen_weights_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen Linear and Conv2d weights and biases in `dtype`, the autocast dtype the run trains
        and evaluates in. Autocast casts them to `dtype` before every matmul anyway, so every result is
        bit-identical; what goes is the cast itself, each step (0.2 ms of a 16 ms ViT-B/16 step on an H200,
        benchmarks/RESULTS.md). Trainable parameters, LayerNorms and embeddings stay fp32. Only for runs
        under autocast: an fp32 forward would refuse the mixed dtypes."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                for param in module.parameters(recurse=False):
                    if not param.requires_grad:
                        param.data = param.data.to(dtype)

    def head(self, token: torch.Tensor, gist: bool = False) -> torch.Tensor:
        head = self.gist_head if gist and self.gist_head is not None else self.vit.head
        return head(self.vit.head_drop(self.vit.fc_norm(token)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.compile_mode is not None and torch.is_grad_enabled():
            x = compiled_tokens(self.compile_mode)(self, images)
        else:
            x = self.tokens(images)
        cls_logits = self.head(x[:, 0])
        gist_logits = self.head(x[:, 1], gist=True) if self.gist is not None else None
        return cls_logits, gist_logits

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        cls_logits, gist_logits = self(images)
        if self.predict_from == "gist":
            return gist_logits
        if self.predict_from == "mean":
            return (cls_logits + gist_logits) / 2
        return cls_logits


# Inductor options of the compiled token pipeline. Buffer reuse off: with a reused nested compile region,
# inductor (torch 2.11-2.14 at least) lets a later buffer overwrite one the region's backward still reads, and
# the gradients of every block but the last come out wrong (tests/test_module.py catches it on the CPU).
COMPILE_OPTIONS = {"allow_buffer_reuse": False}
COMPILE_MODES = ("default", "reduce-overhead")  # reduce-overhead: the same, in CUDA graphs


def skip_unread_graph_scripts() -> None:
    """Stop inductor writing a script of each graph it compiles when nothing will read it.

    torch 2.11's inductor renders every graph it compiles as a runnable script (parsing each Triton
    kernel's source) for structured-trace logging (TORCH_TRACE), and does so whether or not that log has a
    listener; later versions (2.14) render it only for a listener. It cost 0.8-0.9 s of each cold
    compile of ViT-B/16 on an H200 (benchmarks/RESULTS.md). This wraps torch's renderer so that a call from
    inductor's compiler with no trace listener writes nothing; every other caller (the minifier, a
    standalone repro) and any traced run get the script as before. Safe to call more than once."""
    try:
        from torch._dynamo.repro import after_aot
        from torch._logging._internal import LazyTraceHandler, trace_log
    except ImportError:  # another torch layout: leave it alone
        return
    render = getattr(after_aot, "save_graph_repro", None)
    if render is None or getattr(render, "skips_unread", False):
        return

    def trace_listens() -> bool:  # torch's own handler without a directory (TORCH_TRACE unset) writes nothing
        return any(not isinstance(h, LazyTraceHandler) or getattr(h, "root_dir", "") is not None
                   for h in trace_log.handlers)

    @functools.wraps(render)
    def save_graph_repro(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__")
        if caller == "torch._inductor.compile_fx" and not trace_listens():
            return None
        return render(*args, **kwargs)

    save_graph_repro.skips_unread = True
    after_aot.save_graph_repro = save_graph_repro


# Inductor's variable that forces the setting below; its compile workers read it when they start.
STATIC_LAUNCH_VARIABLE = "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"


def launch_own_kernels_statically() -> None:
    """Have inductor launch the adapters' Triton kernels (models/skinny.py) as it launches its own, through
    torch's static CUDA launcher, not through a launcher that Triton builds with the C compiler.

    A user-written kernel otherwise gets a Triton launcher per signature, and building one runs gcc
    (0.26 s each on an H200) whenever Triton's cache lacks it. In a cold compile on the H200 the first
    backward took 3.4 s instead of 4.2 s (benchmarks/RESULTS.md). A kernel the static launcher cannot take
    falls back to Triton's launcher. The setting goes to this process and, through the environment, to the
    compile workers, which start at the first compile. A value the user set in the environment is kept;
    torch versions without the setting are left alone."""
    import torch._inductor.config as inductor_config  # torch.compile imports it anyway; slow to import early

    has_setting = hasattr(inductor_config, "static_launch_user_defined_triton_kernels")
    if has_setting and STATIC_LAUNCH_VARIABLE not in os.environ:
        inductor_config.static_launch_user_defined_triton_kernels = True
        os.environ[STATIC_LAUNCH_VARIABLE] = "1"


@functools.cache
def compiled_tokens(mode: str):
    """One compiled `PeftViT.tokens` per mode for the whole process. It holds no model, so a finished
    job's model is freed at once; a compiled bound method would keep it alive until the next cyclic
    garbage collection (seen on an H200 as 0.3 GiB per finished ViT-B/16 model)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
    skip_unread_graph_scripts()
    launch_own_kernels_statically()
    options = {**COMPILE_OPTIONS, "triton.cudagraphs": mode == "reduce-overhead"}
    return torch.compile(PeftViT.tokens, dynamic=False, options=options)
