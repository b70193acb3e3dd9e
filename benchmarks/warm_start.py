"""Where a new process's first training steps go (a GPU development tool; numbers go to benchmarks/RESULTS.md).

    PYTHONPATH=src python benchmarks/warm_start.py [--steps 6] [--eager] [--sdpa flash]
        [--inductor NAME=VALUE ...]

Run it twice with one TORCHINDUCTOR_CACHE_DIR: the first process compiles cold, the second finds every
graph in the on-disk caches, as a new `python -m gist_exp.train` job after an earlier one does. It
builds compile=true's model (ViT-B/16 adapter + GIST, frozen weights in bf16, the token pipeline
compiled with CUDA graphs), then times, each synced: the imports, the model's build, the forward, backward
and optimizer step of each of the first training steps, and the first eager evaluation batches (two of 512, then two of 344),
with the attention backends the library evaluates with (`EVAL_ATTENTION`: flash on a GPU) unless `--sdpa` names one.
After the first step it prints torch's compile-time breakdown and which on-disk caches were hit. `--eager`
leaves the model uncompiled: its first step is the CUDA libraries' own start-up.
"""

from __future__ import annotations

import time

started = time.perf_counter()

import argparse  # noqa: E402  (after the clock starts: the imports are timed)
import contextlib  # noqa: E402
import functools  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.utils import compile_times, counters  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from gist_exp.models import build_model, gist_loss  # noqa: E402
from gist_exp.module import EVAL_ATTENTION  # noqa: E402
from step_overhead import BACKBONE, GIST, SDPA_BACKENDS, only_sdpa, set_inductor_options  # noqa: E402

PEFT = dict(name="adapter", variant="shared_parallel")  # the adapter at its defaults


def synced(fn) -> float:
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eager", action="store_true", help="do not compile")
    parser.add_argument("--sdpa", default="default", choices=SDPA_BACKENDS,
                        help="the only attention backend allowed")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="set a torch._inductor.config option first, e.g. compile_threads=1")
    args = parser.parse_args()
    imports_s = time.perf_counter() - started
    set_inductor_options(parser, args.inductor)
    only_sdpa(args.sdpa)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = build_model(BACKBONE, PEFT, GIST, num_classes=47)
    model.store_frozen_weights_in(torch.bfloat16)
    if not args.eager:
        model.compile_tokens("cuda-graphs")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    images = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 47, (64,), device="cuda")

    def step() -> tuple[float, float, float]:
        loss = None

        def forward():
            nonlocal loss
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = gist_loss(*model(images), labels)

        def update():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return synced(forward), synced(lambda: loss.backward()), synced(update)

    print(f"eager={args.eager} sdpa={args.sdpa} inductor settings: {args.inductor or 'defaults'}; "
          f"imports {imports_s:.2f} s, model build {build_s:.2f} s")
    step_s = []
    for i in range(args.steps):
        step_s.append(step())
        if i == 0 and not args.eager:
            print(compile_times(repr="str", aggregate=True))
            hits = {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items()
                    if "cache" in k or "hit" in k or "miss" in k}
            print(f"caches after the first step: {hits}")
    print("steps s (forward + backward + optimizer): "
          + "  ".join(f"{sum(t):.3f} ({t[0]:.3f} + {t[1]:.3f} + {t[2]:.3f})" for t in step_s))
    model.eval()
    evaluation = torch.randint(0, 256, (512, 3, 224, 224), dtype=torch.uint8, device="cuda")
    attention = sdpa_kernel(EVAL_ATTENTION) if args.sdpa == "default" else contextlib.nullcontext()  # --sdpa: that only
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), attention:
        eval_s = [synced(functools.partial(model.predict, evaluation)) for _ in range(2)]
        eval_s += [synced(functools.partial(model.predict, evaluation[:344])) for _ in range(2)]  # dtd's last batch
    print("eval batches of 512, 512, 344, 344 s: " + " ".join(f"{t:.3f}" for t in eval_s))
    print(f"total {time.perf_counter() - started:.1f} s since the process started its imports")


if __name__ == "__main__":
    main()
