"""Does compile=true's training graph compute what the eager model computes? (a GPU check)

    PYTHONPATH=src python benchmarks/compiled_matches_eager.py

ViT-B/16 adapter + GIST as a bf16-mixed run holds it (frozen weights in bf16), in eval mode (no dropout,
so both draw nothing) with autograd on, so the compiled training path (the embedding and blocks compiled
regionally, the pipeline's forward and backward captured as CUDA graphs) runs. Prints
||compiled - eager|| / ||eager|| for the CLS and Gist logits and for every trainable parameter's gradient, over
three steps on fresh random images. bf16 operands: expect 1e-3 to 1e-2.
"""

from __future__ import annotations

import torch

from gist_exp.models import build_model
from step_overhead import BACKBONE, GIST, only_sdpa


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    only_sdpa("default")
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        with torch.device("cuda"):
            model = build_model(BACKBONE, dict(name="adapter", variant="shared_parallel"), GIST, num_classes=47)
        model.store_frozen_weights_in(torch.bfloat16)
        models.append(model.eval())
    eager, compiled = models
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_tokens("cuda-graphs")
    worst = 0.0
    for step in range(3):
        images = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, device="cuda")
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                cls_logits, gist_logits = model(images)
            (cls_logits.float().logsumexp(1).sum() + gist_logits.float().square().mean()).backward()
            results.append({"cls logits": cls_logits.detach().clone(), "gist logits": gist_logits.detach().clone(),
                            **{n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}})
        errors = {name: relative(results[1][name], ref) for name, ref in results[0].items()}
        name = max(errors, key=errors.get)
        worst = max(worst, errors[name])
        print(f"step {step}: cls logits {errors['cls logits']:.2e}, gist logits {errors['gist logits']:.2e}, "
              f"{len(errors) - 2} gradients up to {errors[name]:.2e} ({name})")
    print(f"worst relative difference {worst:.2e} ({'fine' if worst < 2e-2 else 'TOO LARGE'})")


if __name__ == "__main__":
    main()
