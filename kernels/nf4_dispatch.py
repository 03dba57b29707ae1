"""Triton kernels of ``fastllm::nf4_matmul`` / ``fastllm::nf4_matmul_t`` (declared in ``fastllm.ops.nf4``).

Registered for CUDA, and for CPU under ``TRITON_INTERPRET=1`` (so the CPU tests run the Triton code). Every launch
runs on the tensors' device and its current stream.

- M <= SMALL_M (decode): the fused GEMV (``nf4_fused``).
- Larger M, forward and grad_x: the faster of the fused GEMM ("fused") and the dequantize kernel into a scratch
  buffer followed by ``torch.matmul`` / cuBLAS ("dequant"), measured on the GPU at first use per
  (direction, M bucket, N, K, dtype, device) and cached (``fastllm.ops.gemm_choice``; ``FASTLLM_NF4_GEMM`` forces
  one). Under the interpreter nothing is timed: "fused" unless forced.
"""

from __future__ import annotations

import torch

from fastllm.ops.gemm_choice import GPU_GEMM, m_bucket
from fastllm.ops.nf4 import SMALL_M

from ._config import INTERPRET, device_guard
from .nf4_dense import dequantize_to_scratch
from .nf4_fused import fused_backward, fused_forward

_DEVICES = ("cuda", "cpu") if INTERPRET else "cuda"


def dequant_forward(x2d: torch.Tensor, tensors: tuple, bias: torch.Tensor | None, blocksize: int, n: int):
    """x2d (M, K) @ W^T + bias with W dequantized whole into the scratch buffer, then one cuBLAS GEMM."""
    with device_guard(x2d):
        w = dequantize_to_scratch(tensors, blocksize, n, x2d.shape[1], x2d.dtype)
        return torch.nn.functional.linear(x2d, w, bias)


def dequant_backward(g2d: torch.Tensor, tensors: tuple, blocksize: int, k: int) -> torch.Tensor:
    """grad_y (M, N) @ W with W dequantized whole into the scratch buffer, then one cuBLAS GEMM."""
    with device_guard(g2d):
        return g2d @ dequantize_to_scratch(tensors, blocksize, g2d.shape[1], k, g2d.dtype)


@torch.library.register_kernel("fastllm::nf4_matmul", _DEVICES)
def _(x, data, absmax, nested_absmax, offset, bias, blocksize, n):
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2d.shape
    tensors = (data, absmax, nested_absmax, offset)
    if m <= SMALL_M:
        y = fused_forward(x2d, tensors, bias, blocksize, n)
    else:
        paths = {
            "fused": lambda: fused_forward(x2d, tensors, bias, blocksize, n),
            "dequant": lambda: dequant_forward(x2d, tensors, bias, blocksize, n),
        }
        y = GPU_GEMM.run(("fwd", m_bucket(m), n, k, x.dtype, x.device), paths, x.device)
    return y.reshape(*x.shape[:-1], n)


@torch.library.register_kernel("fastllm::nf4_matmul_t", _DEVICES)
def _(grad_y, data, absmax, nested_absmax, offset, blocksize, k):
    g2d = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
    m, n = g2d.shape
    tensors = (data, absmax, nested_absmax, offset)
    paths = {
        "fused": lambda: fused_backward(g2d, tensors, blocksize, k),
        "dequant": lambda: dequant_backward(g2d, tensors, blocksize, k),
    }
    grad_x = GPU_GEMM.run(("bwd", m_bucket(m), n, k, grad_y.dtype, grad_y.device), paths, grad_y.device)
    return grad_x.reshape(*grad_y.shape[:-1], k)
