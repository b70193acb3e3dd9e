"""The classifier: a timm VisionTransformer run on the sequence [CLS, GIST, prompts, patches]."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

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
        self.cuda_graphs: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}  # filled by training calls
        self.patchify = is_patchify(vit.patch_embed)

    @property
    def prompt_start(self) -> int:
        return 1 + (self.gist is not None)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the sequence the first block takes: [CLS, Gist, prompts, patches]."""
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
        return x

    def tokens(self, images: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """The final-normed tokens. `compiled`: the embedding and each block through their torch.compile'd code."""
        embed, run_block = compiled_parts() if compiled else (PeftViT.embed, call_block)
        x = embed(self, images)
        start = self.prompt_start
        for i, block in enumerate(self.vit.blocks):
            if self.prompts is not None and self.prompts.deep and i > 0:
                end = start + self.prompts.num_prompts
                x = torch.cat([x[:, :start], self.prompts(i, x.shape[0]), x[:, end:]], dim=1)
            x = run_block(block, x)
        return self.vit.norm(x)

    def compile_tokens(self, mode: str = "default") -> None:
        """Compile the token pipeline for training (parameters, hence checkpoint keys, unchanged).

        Regional compilation: the embedding and the block are compiled, and every block of the same kind runs
        the one block graph, so dynamo traces one block instead of twelve (a new process's first step on the
        H200: 2.0-2.3 s instead of about 4.5 s with a warm compile cache, 9-14.7 s instead of 20-25 s cold;
        benchmarks/RESULTS.md). Dynamo's guards, module hooks included (`compiled_parts`), keep a block that
        differs (other modules, settings, hooks) from running another block's code. `cuda-graphs` then captures
        the compiled pipeline's forward and backward as one CUDA graph each (`capture_tokens`) per batch shape,
        train/eval mode and autocast dtype, at its first training call. Static shapes: a batch of another size
        compiles and captures again, so the training loader keeps batches at one size.
        The heads and the loss stay eager: their shapes depend on the task's class count, and leaving them out
        lets every task of a sweep reuse the compiled code. Evaluation (autograd off) runs the eager pipeline:
        an inference graph takes longer to compile than it saves on VTAB test sets (benchmarks/RESULTS.md)."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
        self.compile_mode = mode
        self.cuda_graphs = {}

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
        if self.compile_mode is None or not torch.is_grad_enabled():
            x = self.tokens(images)
        elif self.compile_mode == "cuda-graphs":
            key = (self.training, images.shape, images.dtype, images.device, autocast_dtype(images.device))
            if key not in self.cuda_graphs:
                self.cuda_graphs[key] = capture_tokens(self, images)
            x = self.cuda_graphs[key](images)
        else:
            x = self.tokens(images, compiled=True)
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


COMPILE_MODES = ("default", "cuda-graphs")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def capture_tokens(model: PeftViT, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled token pipeline's forward and backward, each captured as one CUDA graph
    (`torch.cuda.make_graphed_callables`) for batches like `images`, in the model's current train/eval mode
    and autocast dtype. A step then replays two graphs: no Python, guards or kernel launches of its own on the
    host. The gradients it returns live in the graph's memory until the next step's backward, which the
    training loop's zero_grad(set_to_none=True) allows for. Forward hooks inside the pipeline run only
    while capturing. The graphs read the parameters' memory: a parameter given a new tensor afterwards
    (`param.data = ...`) would not be seen, so `store_frozen_weights_in` runs before the first training step.
    Each capture leaves cuBLAS a workspace for the stream it ran on; `train.run` frees them after the job
    (`free_cublas_workspaces`).

    The parameters are arguments of the captured function only so that its backward returns their gradients.
    torch then warns once that an AccumulateGrad node's stream differs from the training loop's (why was not
    pinned down: capturing through aliases of the parameters warned too); a step measured as fast as under
    torch's own CUDA graphs (benchmarks/RESULTS.md)."""
    heads = {id(p) for head in (model.vit.head, model.gist_head) if head is not None for p in head.parameters()}
    params = tuple(p for p in model.parameters() if p.requires_grad and id(p) not in heads)

    def run(images: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # called only while capturing
        return model.tokens(images, compiled=True)

    dtype = autocast_dtype(images.device)
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(run, (images.clone(), *params), allow_unused_input=True)
    return lambda batch: graphed(batch, *params)  # holds tensors, not the model: no reference cycle


def free_cublas_workspaces() -> None:
    """Free the workspaces cuBLAS keeps for every stream it has run on. `make_graphed_callables` warms up and
    captures on a new stream each time, so every `capture_tokens` left one behind for the life of the process:
    0.064 GiB per finished ViT-B/16 model on an H200, which gc does not free (benchmarks/RESULTS.md). Call it
    only when no CUDA graph that ran a matmul is alive: a graph keeps writing to the workspace it was captured
    with. cuBLAS allocates a new workspace at its next call."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available():
        clear()


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
def compiled_parts() -> tuple[Callable, Callable]:
    """The compiled `PeftViT.embed` and block call, one each for the whole process. They hold no model, so a
    finished job's model is freed at once; a compiled bound method would keep it alive until the next cyclic
    garbage collection (seen on an H200 as 0.3 GiB per finished ViT-B/16 model)."""
    skip_unread_graph_scripts()
    launch_own_kernels_statically()
    # Dynamo leaves module hooks out of its guards by default, so a block with a hook would run the code traced
    # for a block without one (seen on the CPU); with them guarded, it computes what it computes eagerly.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(PeftViT.embed, dynamic=False), torch.compile(call_block, dynamic=False)
