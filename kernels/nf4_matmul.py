"""INTERIM (to be replaced by the Triton kernels): y = x @ W^T + b by dequantize + matmul."""

from __future__ import annotations

import torch

from fastllm.nf4 import NF4Weight


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x.dtype."""
    return torch.nn.functional.linear(x, w.dequantize(x.dtype), bias)


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (N, K) in dtype."""
    return w.dequantize(dtype)
