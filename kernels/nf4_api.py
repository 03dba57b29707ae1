"""Public NF4 API of ``fastllm.kernels``: validating wrappers around the ``torch.ops.fastllm`` NF4 ops.

``nf4_matmul`` / ``nf4_matmul_t`` / ``nf4_dequantize`` check their arguments, then call the op, which dispatches
on the tensors' device (Triton on CUDA, C++ / PyTorch on CPU; see ``fastllm.ops.nf4``).
"""

from __future__ import annotations

import torch

from fastllm.nf4 import FLOAT_DTYPES, NF4Weight

# Importing registers the Triton kernels of the ops called below.
from . import nf4_dense, nf4_dispatch  # noqa: F401


def check_weight(w: NF4Weight) -> tuple[int, int]:
    """(N, K) of a 2-D NF4 weight whose K is a multiple of its blocksize; ValueError/TypeError otherwise."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be a fastllm.nf4.NF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"w must be a 2-D weight (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % w.blocksize:
        raise ValueError(
            f"w: K={k} (in_features) must be a multiple of blocksize={w.blocksize} for the NF4 matmul kernels"
        )
    # The kernels index the packed bytes and scales directly: their sizes and dtypes must match.
    if w.data.dtype != torch.uint8 or w.data.numel() != n * k // 2:
        raise ValueError(
            f"w.data must be uint8 with N*K/2 = {n * k // 2} bytes, got {w.data.dtype} {tuple(w.data.shape)}"
        )
    absmax_dtype = torch.uint8 if w.double_quant else torch.float32
    if w.absmax.dtype != absmax_dtype or w.absmax.numel() != n * k // w.blocksize:
        raise ValueError(
            f"w.absmax must be {absmax_dtype} with N*K/blocksize = {n * k // w.blocksize} entries, "
            f"got {w.absmax.dtype} {tuple(w.absmax.shape)}"
        )
    return n, k


def _check_activation(name: str, t: torch.Tensor, features: int, what: str, w: NF4Weight) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1 or t.shape[-1] != features:
        raise ValueError(f"{name} must have shape (..., {features}) ({what} of w), got {tuple(t.shape)}")
    if t.device != w.device:
        raise ValueError(f"{name} is on {t.device} but w is on {w.device}")


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W dequantized on the fly.

    Args:
        x: (..., K) float16 / bfloat16 / float32.
        w: NF4 weight of shape (N, K); K must be a multiple of ``w.blocksize``. Frozen (no grad).
        bias: optional (N,) in x.dtype.
    Returns:
        y: (..., N) in x.dtype, accumulated in fp32. Differentiable in x and bias.
    """
    n, k = check_weight(w)
    _check_activation("x", x, k, "in_features K", w)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must have shape ({n},), dtype {x.dtype} and device {x.device} like x; "
                f"got shape {tuple(bias.shape)}, dtype {bias.dtype}, device {bias.device}"
            )
        bias = bias.contiguous()
    return torch.ops.fastllm.nf4_matmul(x, *w.tensors(), bias, w.blocksize, n)


def nf4_matmul_t(grad_y: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad_y @ W, the input gradient of :func:`nf4_matmul` (W dequantized on the fly).

    Args:
        grad_y: (..., N) float16 / bfloat16 / float32.
        w: NF4 weight of shape (N, K); K a multiple of ``w.blocksize``.
    Returns:
        (..., K) in grad_y.dtype, accumulated in fp32. Differentiable in grad_y.
    """
    n, k = check_weight(w)
    _check_activation("grad_y", grad_y, n, "out_features N", w)
    return torch.ops.fastllm.nf4_matmul_t(grad_y, *w.tensors(), w.blocksize, k)


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (N, K) in ``dtype`` (default ``w.dtype``), computed as NF4 * scale in fp32 and rounded once.

    Bit-identical to ``fastllm.reference.dequantize_nf4`` on every device. K must be a multiple of ``w.blocksize``.
    """
    dtype = dtype or w.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    n, k = check_weight(w)
    return torch.ops.fastllm.nf4_dequantize(*w.tensors(), w.blocksize, n, k, dtype)
