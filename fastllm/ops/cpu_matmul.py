"""How the CPU implementations multiply: the dtype of 16-bit matmuls, and the cache-sized bands of a big operand.

PyTorch multiplies bf16 / fp16 CPU tensors in their own dtype. On a CPU without native 16-bit multiply
instructions that is slow: bf16 GEMMs are emulated through oneDNN, fp16 ones fall back to scalar loops. There the
CPU paths (NF4 large-M matmuls, the fused attention's backward, the fused loss's dense head) compute in fp32 and
round their outputs back to the inputs' dtype, which is also the more exact result: 2.0-3.1x faster in bf16 on the
AVX-512 Xeon of the CPU machine, which lacks AVX512-BF16 (``python -m benchmarks.cpu_matmul_dtype``). CPUs
with AMX or AVX512-BF16 (bf16) or AMX-FP16 (fp16) keep the dtype.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to multiply ``dtype`` operands in on this CPU: ``dtype``, or fp32 for 16-bit dtypes it lacks
    native instructions for."""
    cpu = torch.cpu
    native = {
        torch.bfloat16: lambda: cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported(),
        torch.float16: lambda: cpu._is_amx_fp16_supported(),
    }.get(dtype)
    return torch.float32 if native is not None and not native() else dtype


def bands(total: int, other: int, dtype: torch.dtype, budget_bytes: int, multiple: int = 1) -> list[slice]:
    """Slices of range(total) whose rows of ``other`` elements in ``dtype`` hold about ``budget_bytes`` each: a band
    length rounded down to a multiple of ``multiple`` (at least one multiple), the last band partial."""
    step = budget_bytes // (other * torch.finfo(dtype).bits // 8)
    step = max(multiple, step - step % multiple)
    return [slice(i, min(total, i + step)) for i in range(0, total, step)]
