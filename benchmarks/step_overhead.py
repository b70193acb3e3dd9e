"""Where one training step's time goes (a GPU development tool; numbers go to benchmarks/RESULTS.md).

    PYTHONPATH=src python benchmarks/step_overhead.py [--steps 60]

ViT-B/16 adapter + GIST, batch 64, random uint8 images already on the GPU. Each variant runs the
same step (forward, GIST loss, backward, fused AdamW, zero_grad) and reports the median step time
measured with CUDA events and the host time spent issuing it: a host time close to the step time
means the step is bound by Python / launch overhead, not by the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gist_exp.models import build_model, gist_loss

BACKBONE = dict(name="vit_base_patch16_224.augreg_in21k", weights="random")
PEFT = dict(name="adapter", variant="shared_parallel", rank=8, alpha=8, targets=["qkv"])
GIST = dict(enabled=True, head="shared", predict="cls", init_range=0.5, dropout=0.1)


def make(compile_mode: str | None, peft: str):
    torch.manual_seed(0)
    model = build_model(BACKBONE, {**PEFT, "name": peft}, GIST, 47).cuda()
    if compile_mode:
        model.compile(dynamic=False, mode=None if compile_mode == "default" else compile_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    return model, optimizer


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


def measure(step, steps: int, batch: int = 64) -> dict:
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 47, (batch,), device="cuda")
    start = time.perf_counter()
    for _ in range(10):
        step(images, labels)
    torch.cuda.synchronize()
    warmup = time.perf_counter() - start
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
    ms = statistics.median(gpu) * 1e3
    return {"step_ms": ms, "host_ms": statistics.median(host) * 1e3, "img_s": batch / ms * 1e3, "warmup_s": warmup}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default="eager,compiled,compiled+loss,reduce-overhead")
    parser.add_argument("--peft", default="adapter", help="adapter | linear (gist token + head only) | ...")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{'variant':<18} {'step ms':>8} {'host ms':>8} {'img/s':>8} {'warmup s':>9}")
    for variant in args.variants.split(","):
        mode = {"eager": None, "compiled": "default", "compiled+loss": "default",
                "reduce-overhead": "reduce-overhead"}[variant]
        model, optimizer = make(mode, args.peft)
        loss = torch.compile(gist_loss, dynamic=False) if variant in ("compiled+loss", "reduce-overhead") else gist_loss
        r = measure(step_fn(model, optimizer, loss), args.steps)
        print(f"{variant:<18} {r['step_ms']:>8.2f} {r['host_ms']:>8.2f} {r['img_s']:>8,.0f} {r['warmup_s']:>9.1f}",
              flush=True)
        del model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
