"""What multiplying 16-bit inputs in fp32 (``fastllm.ops.cpu_matmul``) buys on this CPU, per CPU path.

    python -m benchmarks.cpu_matmul_dtype [--out DIR]   # about two minutes on the 2-core CPU machine

For each CPU path that follows ``cpu_matmul.matmul_dtype``, bf16 inputs, forward + backward, timed interleaved
(``harness.time_interleaved``) in two settings: ``fp32`` (the rule's choice on a CPU without native 16-bit matmuls)
and ``bf16`` (the rule overridden to keep the inputs' dtype, as on a CPU with AMX or AVX512-BF16):

- ``nf4_matmul``: x (512, 4096) @ W^T, W 4096 x 4096 in NF4, the banded large-M path (FASTLLM_NF4_GEMM=fused);
- ``attention``: causal, B=2, 8 query / 2 key-value heads, S=1024, D=64 (the fused CPU attention's backward);
- ``linear_cross_entropy``: T=1024 tokens, hidden 1024, vocabulary 32000, dense head.

Writes ``cpu_matmul_dtype.json`` (each setting's Timing and the ratio) under ``--out`` (default
benchmarks/results/<device>/) and prints a table. On a CPU that has native bf16 matmuls both settings are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the CPU implementations, as the benchmark runner does

import torch  # noqa: E402

from benchmarks.environment import REPO, device_name, device_slug  # noqa: E402
from benchmarks.harness import Settings, time_interleaved  # noqa: E402
from fastllm import nf4  # noqa: E402
from fastllm._atomic import atomic_write  # noqa: E402
from fastllm.kernels import attention, linear_cross_entropy, nf4_matmul  # noqa: E402
from fastllm.ops import attention as attention_ops  # noqa: E402
from fastllm.ops import gemm_choice  # noqa: E402
from fastllm.ops import linear_cross_entropy as loss_ops  # noqa: E402
from fastllm.ops import nf4 as nf4_ops  # noqa: E402

BF16 = torch.bfloat16


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def _steps() -> dict[str, tuple[object, object]]:
    """name -> (the ops module whose rule is overridden, one forward + backward)."""
    w = nf4.quantize(_randn(4096, 4096, seed=0))
    x = _randn(512, 4096, seed=1).requires_grad_()
    q = _randn(2, 8, 1024, 64, seed=2).requires_grad_()
    k, v = (_randn(2, 2, 1024, 64, seed=s).requires_grad_() for s in (3, 4))
    hidden = _randn(1024, 1024, seed=5).requires_grad_()
    head = _randn(32000, 1024, seed=6, scale=1024**-0.5)
    labels = torch.randint(0, 32000, (1024,), generator=torch.Generator().manual_seed(7))

    def matmul():
        with gemm_choice.forced("fused"):
            nf4_matmul(x, w).sum().backward()

    return {
        "nf4_matmul": (nf4_ops, matmul),
        "attention": (attention_ops, lambda: attention(q, k, v, causal=True).sum().backward()),
        "linear_cross_entropy": (loss_ops, lambda: linear_cross_entropy(hidden, head, labels).backward()),
    }


@contextlib.contextmanager
def _own_dtype(module):
    """``module`` multiplies in the inputs' own dtype inside the block."""
    rule = module.matmul_dtype
    module.matmul_dtype = lambda dtype: dtype
    try:
        yield
    finally:
        module.matmul_dtype = rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings(torch.device("cpu"))
    results = {"device": device_name(settings.device), "rule_for_bf16": str(nf4_ops.matmul_dtype(BF16)), "cases": {}}
    for name, (module, step) in _steps().items():

        def own(module=module, step=step):
            with _own_dtype(module):
                step()

        fp32, bf16 = time_interleaved([step, own], settings)
        ratio = bf16.median_ms / fp32.median_ms
        results["cases"][name] = {"fp32": vars(fp32), "bf16": vars(bf16), "bf16_over_fp32": ratio}
        print(f"{name:22s} fp32 {fp32.median_ms:9.1f} ms   bf16 {bf16.median_ms:9.1f} ms   {ratio:.2f}x")
    out = args.out or REPO / "benchmarks" / "results" / device_slug(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "cpu_matmul_dtype.json", "w") as f:
        f.write(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
