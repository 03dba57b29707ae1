"""Triton kernels of ``fastllm::nf4_matmul`` / ``fastllm::nf4_matmul_t`` (declared in ``fastllm.ops.nf4``).

Registered for CUDA, and for CPU under ``TRITON_INTERPRET=1`` (so the CPU tests run the Triton code).
"""

from __future__ import annotations

import torch

import fastllm.ops.nf4  # noqa: F401  (declares the ops whose kernels this module registers)

from ._config import INTERPRET
from .nf4_fused import fused_backward, fused_forward

_DEVICES = ("cuda", "cpu") if INTERPRET else "cuda"


@torch.library.register_kernel("fastllm::nf4_matmul", _DEVICES)
def _(x, data, absmax, nested_absmax, offset, bias, blocksize, n):
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = fused_forward(x2d, (data, absmax, nested_absmax, offset), bias, blocksize, n)
    return y.reshape(*x.shape[:-1], n)


@torch.library.register_kernel("fastllm::nf4_matmul_t", _DEVICES)
def _(grad_y, data, absmax, nested_absmax, offset, blocksize, k):
    g2d = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
    return fused_backward(g2d, (data, absmax, nested_absmax, offset), blocksize, k).reshape(*grad_y.shape[:-1], k)
