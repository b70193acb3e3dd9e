"""Where one training step's time goes (a GPU development tool; numbers go to benchmarks/RESULTS.md).

    PYTHONPATH=src python benchmarks/step_overhead.py [--steps 60] [--variants ...] [--profile] [--eval]
        [--adapter-form ...] [--block-form ...] [--no-kernels] [--frozen-fp32] [--bf16-stream]
        [--conv-patch-embed] [--sdpa ...] [--inductor NAME=VALUE ...] [--next-models N [--collect]]

ViT-B/16 adapter + GIST, batch 64, random uint8 images already on the GPU. Each variant runs the
same step (forward, GIST loss, backward, fused AdamW, zero_grad) and reports the median step time
measured with CUDA events and the host time spent issuing it: a host time close to the step time
means the step is bound by Python / launch overhead, not by the GPU. "piped ms" is the mean step of
as many steps run back to back, without a sync in between, as training runs them (the synced "step ms"
adds the launch latency). "warmup s" is the first 10 steps, compilation included; "2nd model s" is
the same for a second model with another class count built in the same process, as the next job of a
sweep is.
"""

from __future__ import annotations

import argparse
import ast
import functools
import statistics
import time
import weakref

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

import adapter_forms
import block_forms
import gist_exp.models.vit
from gist_exp.models import build_model, gist_loss
from gist_exp.models.adapter import Adapter

BACKBONE = dict(name="vit_base_patch16_224.augreg_in21k", weights="random")
PEFT = dict(name="adapter", variant="shared_parallel", rank=8, alpha=8, targets=["qkv"])
GIST = dict(enabled=True, head="shared", predict="cls", init_range=0.5, dropout=0.1)
VARIANTS = {  # name: (what is compiled, torch.compile mode, the loss's torch.compile mode or None: eager)
    "eager": (None, None, None),
    "compiled": ("tokens", "default", None),  # compile=true on the CPU: the embedding and blocks compiled regionally
    "cuda-graphs": ("tokens", "cuda-graphs", None),  # what compile=true does on a GPU
    "loss-compiled": ("tokens", "cuda-graphs", "default"),  # and the GIST loss, without CUDA graphs
    "loss-graphed": ("tokens", "cuda-graphs", "reduce-overhead"),  # and the GIST loss, in a CUDA graph
    "regional": ("blocks", "reduce-overhead", None),  # each block compiled in torch's own CUDA graphs
    "whole-model": ("whole", "reduce-overhead", "default"),  # model and loss compiled, as compile=true did before
}


SDPA_BACKENDS = ["default", "flash", "efficient", "cudnn"]


def only_sdpa(backend: str) -> None:
    """Allow only this attention backend ("default": leave PyTorch's choice, cuDNN on an H200)."""
    if backend != "default":
        for name, flag in (("flash", "flash"), ("efficient", "mem_efficient"), ("cudnn", "cudnn")):
            getattr(torch.backends.cuda, f"enable_{flag}_sdp")(name == backend)
        torch.backends.cuda.enable_math_sdp(False)


def set_inductor_options(parser: argparse.ArgumentParser, settings: list[str]) -> None:
    """Apply --inductor NAME=VALUE settings to torch._inductor.config (NAME may be dotted: triton.cudagraph_trees)."""
    for setting in settings:
        name, _, value = setting.partition("=")
        *groups, option = name.split(".")
        config = functools.reduce(lambda obj, group: getattr(obj, group, None), groups, torch._inductor.config)
        if config is None or not hasattr(config, option):
            parser.error(f"--inductor {setting}: torch._inductor.config has no option {name!r}")
        setattr(config, option, ast.literal_eval(value))


def make(variant: str, peft: str, num_classes: int = 47, frozen_fp32: bool = False, conv: bool = False,
         adapter_form: str = "linear", block_form: str = "block", bf16_stream: bool = False, kernels: bool = True):
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = build_model(BACKBONE, {**PEFT, "name": peft, "kernels": kernels}, GIST, num_classes)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    if not frozen_fp32:  # as a bf16-mixed run of the library (train.prepare)
        model.store_frozen_weights_in(torch.bfloat16)
    model.patchify = not conv
    unit, mode, loss_mode = VARIANTS[variant]
    if adapter_form != "linear":
        for module in model.modules():
            if isinstance(module, Adapter):
                module.forward = functools.partial(adapter_forms.FORMS[adapter_form], module)
    if block_form == "junctions":
        import fused_junctions  # Triton: imported only when asked for
        fused_junctions.use_junctions(model)
    elif block_form != "block":
        block_forms.use_form(model, block_form)
    if bf16_stream:  # the residual stream in bf16 from the first block on (timm's under autocast is fp32)
        model.vit.blocks[0].register_forward_pre_hook(lambda module, args: (args[0].bfloat16(),))
    loss_fn = gist_loss if loss_mode is None else torch.compile(gist_loss, dynamic=False, mode=loss_mode)
    if unit == "tokens":
        model.compile_tokens(mode)
    elif unit == "blocks":
        for block in model.vit.blocks:
            block.compile(dynamic=False, mode=mode)
    elif unit == "whole":
        model.compile(dynamic=False, mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    return model, optimizer, loss_fn, build_s


def step_fn(model, optimizer, loss_fn):
    def step(images, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cls_logits, gist_logits = model(images)
            loss = loss_fn(cls_logits, gist_logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def batch(size: int = 64, classes: int = 47):
    images = torch.randint(0, 256, (size, 3, 224, 224), dtype=torch.uint8, device="cuda")
    return images, torch.randint(0, classes, (size,), device="cuda")


def warmup(step, images, labels, steps: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(step, steps: int, images, labels) -> dict:
    gpu, host = [], []
    for _ in range(steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        begin.record()
        step(images, labels)
        end.record()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        gpu.append(begin.elapsed_time(end) / 1e3)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):  # back to back, as training runs: the host queues ahead of the GPU
        step(images, labels)
    end.record()
    torch.cuda.synchronize()
    ms = statistics.median(gpu) * 1e3
    return {"step_ms": ms, "host_ms": statistics.median(host) * 1e3, "img_s": len(labels) / ms * 1e3,
            "piped_ms": begin.elapsed_time(end) / steps}


def print_profile(step, images, labels, rows: int = 50) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(images, labels)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def eval_rate(model, size: int = 512, batches: int = 10) -> float:
    images, _ = batch(size)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model.predict(images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model.predict(images)
        torch.cuda.synchronize()
    return size * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--peft", default="adapter", help="adapter | linear (gist token + head only) | lora | vpt")
    parser.add_argument("--frozen-fp32", action="store_true",
                        help="keep the frozen matmul weights in fp32, cast by autocast every step (the library "
                             "stores them in bf16)")
    parser.add_argument("--adapter-form", default="linear", choices=["linear", *adapter_forms.FORMS],
                        help="how the adapter is computed (benchmarks/adapter_forms.py); linear: the module itself")
    parser.add_argument("--no-kernels", action="store_true",
                        help="the adapter's projections by nn.Linear (cuBLAS), not its Triton kernels (peft.kernels)")
    parser.add_argument("--block-form", default="block", choices=["block", "junctions", *block_forms.FORMS],
                        help="how each adapter block is computed (benchmarks/block_forms.py; junctions: "
                             "benchmarks/fused_junctions.py, Triton); block: the module")
    parser.add_argument("--bf16-stream", action="store_true",
                        help="cast the tokens to bf16 before the first block (changes AMP numerics; measuring only)")
    parser.add_argument("--conv-patch-embed", action="store_true",
                        help="embed patches with timm's convolution instead of the matmul over flattened patches")
    parser.add_argument("--sdpa", default="default", choices=SDPA_BACKENDS,
                        help="the only attention backend scaled_dot_product_attention may use")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="set torch._inductor.config.NAME before compiling, e.g. max_autotune_gemm=True "
                             "or coordinate_descent_tuning=True (repeatable)")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each variant")
    parser.add_argument("--eval", action="store_true", help="also time inference in batches of 512 (eager, as evaluation runs)")
    parser.add_argument("--second-model", action="store_true",
                        help="time the warmup of a second model (10 classes) built in the same process")
    parser.add_argument("--next-models", type=int, default=0, metavar="N",
                        help="then train N more models in turn, as a long sweep in one process does, and "
                             "report each one's warmup, step time and GPU memory")
    parser.add_argument("--collect", action="store_true",
                        help="with --next-models: after dropping each model, release its memory as train.run does "
                             "after every job (release_gpu_memory), and report the memory left")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    only_sdpa(args.sdpa)
    set_inductor_options(parser, args.inductor)
    print(f"peft={args.peft} frozen_fp32={args.frozen_fp32} conv_patch_embed={args.conv_patch_embed} "
          f"sdpa={args.sdpa} adapter_form={args.adapter_form} "
          f"block_form={args.block_form} bf16_stream={args.bf16_stream} kernels={not args.no_kernels} "
          f"inductor={args.inductor}")
    print(f"{'variant':<28} {'step ms':>8} {'piped ms':>8} {'host ms':>8} {'img/s':>8} {'build s':>8} {'warmup s':>9} "
          f"{'2nd model s':>11} {'eval img/s':>10}")
    settings = dict(frozen_fp32=args.frozen_fp32, conv=args.conv_patch_embed, adapter_form=args.adapter_form,
                    block_form=args.block_form, bf16_stream=args.bf16_stream, kernels=not args.no_kernels)
    for variant in args.variants.split(","):
        model, optimizer, loss_fn, build_s = make(variant, args.peft, **settings)
        images, labels = batch()
        step = step_fn(model, optimizer, loss_fn)
        warm_s = warmup(step, images, labels)
        r = measure(step, args.steps, images, labels)
        second = eval_img_s = float("nan")
        if args.eval:
            model.eval()
            eval_img_s = eval_rate(model)
            model.train()
        if args.profile and VARIANTS[variant][1] not in ("cuda-graphs", "reduce-overhead"):  # graphs hide kernels
            print_profile(step, images, labels)
        if args.second_model:
            other, other_opt, other_loss, _ = make(variant, args.peft, num_classes=10, **settings)
            second = warmup(step_fn(other, other_opt, other_loss), images, labels % 10)
            del other, other_opt
        print(f"{variant:<28} {r['step_ms']:>8.2f} {r['piped_ms']:>8.2f} {r['host_ms']:>8.2f} {r['img_s']:>8,.0f} {build_s:>8.2f} "
              f"{warm_s:>9.1f} {second:>11.1f} {eval_img_s:>10,.0f}", flush=True)
        del model, optimizer, step
        torch.cuda.empty_cache()
        if args.next_models:
            next_models(variant, args.peft, args.next_models, images, labels, settings, args.collect)


def next_models(variant: str, peft: str, count: int, images, labels, settings: dict, collect: bool) -> None:
    """Models of changing class counts trained one after another, the previous one dropped first (and, with
    `collect`, released as train.run releases a finished job's)."""
    if collect:
        from gist_exp.train import release_gpu_memory  # imports Lightning and Hydra: only when asked
    print(f"  {'model':>5} {'classes':>7} {'warmup s':>8} {'step ms':>8} {'allocated GiB':>13} {'reserved GiB':>12}"
          + (f" {'after release GiB':>17}" if collect else ""))
    for i in range(count):
        classes = (10, 100, 2, 397, 47)[i % 5]
        model, optimizer, loss_fn, _ = make(variant, peft, num_classes=classes, **settings)
        step = step_fn(model, optimizer, loss_fn)
        warm_s = warmup(step, images, labels % classes)
        r = measure(step, 20, images, labels % classes)
        print(f"  {i + 1:>5} {classes:>7} {warm_s:>8.2f} {r['step_ms']:>8.2f} "
              f"{torch.cuda.memory_allocated() / 2**30:>13.2f} {torch.cuda.memory_reserved() / 2**30:>12.2f}",
              end="", flush=True)
        dropped = weakref.ref(model)
        del model, optimizer, step
        if collect:
            release_gpu_memory(dropped)
            print(f" {torch.cuda.memory_allocated() / 2**30:>17.2f}", end="")
        print(flush=True)


if __name__ == "__main__":
    main()
