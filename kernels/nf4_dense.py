"""Triton kernel of ``fastllm::nf4_dequantize``: the dense weight W (N, K) from its NF4 tensors.

Registered for CUDA (and for CPU under ``TRITON_INTERPRET=1``); the op is declared in ``fastllm.ops.nf4``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import fastllm.ops.nf4  # noqa: F401  (declares the op whose kernel this module registers)

from ._config import INTERPRET, device_guard
from .nf4_tile import dequant_tile, weight_args


@triton.jit
def _dequantize_kernel(
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    code_ptr,
    out_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program writes one (BLOCK_N, BLOCK_K) tile of the dense weight.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w = dequant_tile(
        data_ptr,
        absmax_ptr,
        nested_ptr,
        offset_ptr,
        dmap_ptr,
        code_ptr,
        offs_n,
        pid_k * BLOCK_K,
        N,
        K,
        BLOCK_N,
        BLOCK_K,
        BLOCKSIZE,
        DOUBLE_QUANT,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    out = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(tensors: tuple, blocksize: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W (n, k) in ``dtype`` from the weight's tensors (``NF4Weight.tensors()`` order), bit-identical to
    ``fastllm.reference.dequantize_nf4``."""
    data = tensors[0]
    with device_guard(data):
        out = torch.empty((n, k), dtype=dtype, device=data.device)
        args, double_quant = weight_args(*tensors)
        block_n, block_k = 32, 64
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
        # No FMA contraction: the nested scale DYNAMIC[q] * nested + offset rounds twice, as in the reference.
        _dequantize_kernel[grid](*args, out, n, k, blocksize, double_quant, block_n, block_k, enable_fp_fusion=False)
    return out


@torch.library.register_kernel("fastllm::nf4_dequantize", ("cuda", "cpu") if INTERPRET else "cuda")
def _(data, absmax, nested_absmax, offset, blocksize, n, k, dtype):
    return dequantize((data, absmax, nested_absmax, offset), blocksize, n, k, dtype)
