"""What the first call of each CUDA library piece a training job uses costs in a new process (a GPU tool).

    python benchmarks/cuda_startup.py

Times, each synced and in this order: CUDA init, the first bf16 GEMMs of ViT-B/16's shapes (cuBLAS and
cuBLASLt load), scaled_dot_product_attention forward and backward at the training shape (batch 64,
12 heads, 198 tokens: CLS, Gist, 196 patches) and forward at the evaluation shapes (512 and 344), with
the default backend (cuDNN on an H200) and then flash, LayerNorm and GELU, fused AdamW.
"""

from __future__ import annotations

import time

started = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def timed(label: str, fn) -> None:
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    print(f"{label:<52} {time.perf_counter() - start:7.3f} s", flush=True)


def attention(batch: int, backward: bool) -> None:
    q = torch.zeros(batch, 12, 198, 64, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    out = F.scaled_dot_product_attention(q, q, q)
    if backward:
        out.sum().backward()


def main() -> None:
    print(f"imports {time.perf_counter() - started:.2f} s; torch {torch.__version__}")
    timed("CUDA init", lambda: torch.zeros(1, device="cuda"))
    x = torch.zeros(64 * 198, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(2304, 768, device="cuda", dtype=torch.bfloat16)
    timed("first bf16 GEMM (qkv)", lambda: F.linear(x, w))
    timed("second bf16 GEMM, other shape (mlp)", lambda: F.linear(x, torch.zeros(3072, 768, device="cuda", dtype=torch.bfloat16)))
    timed("bf16 GEMM backward shapes", lambda: (F.linear(x, w).t() @ x, F.linear(x, w) @ w))
    for name, backends in (("default", None), ("flash", [SDPBackend.FLASH_ATTENTION])):
        for batch, backward in ((64, True), (64, True), (512, False), (344, False), (512, False)):
            def run():
                if backends:
                    with sdpa_kernel(backends):
                        attention(batch, backward)
                else:
                    attention(batch, backward)
            timed(f"sdpa {name} batch {batch} {'fw+bw' if backward else 'fw'}", run)
    timed("layer_norm + gelu", lambda: F.gelu(F.layer_norm(x.float(), (768,))))
    params = [torch.zeros(768, device="cuda", requires_grad=True) for _ in range(10)]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, fused=True)
    timed("fused AdamW step", opt.step)
    timed("cross entropy", lambda: F.cross_entropy(torch.zeros(64, 47, device="cuda"), torch.zeros(64, dtype=torch.long, device="cuda")))


if __name__ == "__main__":
    main()
