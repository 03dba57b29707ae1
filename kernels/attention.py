"""Fused softmax attention (forward + backward): the public front doors ``attention`` and ``attention_varlen``.

Both validate their arguments and call the ``fastllm::attention_fwd`` op (declared with its fake, autograd and
CPU implementation in ``fastllm.ops.attention``, which also states the masking semantics). This module registers
the Triton kernels as that op's implementation for CUDA tensors, and for CPU tensors under ``TRITON_INTERPRET=1``
(so the CPU tests run the Triton code); plain CPU tensors run PyTorch's fused CPU attention or the reference.
Query lengths up to ``DECODE_MAX_SEQLEN_Q`` (decoding with a KV cache) run the split-KV decode kernel.

``FASTLLM_AUTOTUNE=0`` makes the GPU kernels use their default tiles without autotuning (``_config``).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from fastllm.ops import attention as ops

from ._config import INTERPRET
from .attention_bwd import attention_backward
from .attention_decode import DECODE_MAX_SEQLEN_Q, attention_decode
from .attention_fwd import AttentionLaunch, attention_forward

SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _window_bound(value: int | None, side: str) -> int:
    if value is None or value == -1:
        return -1
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"window: {side} bound must be None, -1 or an int >= 0, got {value!r}")
    return value


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _normalise_options(
    causal: bool, window: tuple[int | None, int | None] | None, softcap: float | None, scale: float | None, dim: int
) -> tuple[float, float, int, int]:
    """-> (scale, softcap or 0.0, window_left, window_right) with causal folded into window_right."""
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window: expected a (left, right) pair, got {window!r}")
        left, right = _window_bound(window[0], "left"), _window_bound(window[1], "right")
    if causal:  # as flash-attn: causal is a window whose right side is 0
        right = 0
    if softcap is not None and not (_is_real(softcap) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected None or a finite float > 0, got {softcap!r}")
    if scale is not None and not (_is_real(scale) and math.isfinite(scale)):
        raise ValueError(f"scale: expected None or a finite float, got {scale!r}")
    if scale is None:
        scale = dim**-0.5
    return float(scale), float(softcap or 0.0), left, right


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    dim = q.shape[-1]
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {dim} not supported, expected one of {SUPPORTED_HEAD_DIMS}")
    if k.shape[-1] != dim:
        raise ValueError(f"k, v: head dim {k.shape[-1]} must equal q's head dim {dim}")
    heads, kv_heads = q.shape[1], k.shape[1]  # (B, H, S, D) and (total, H, D) alike
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q has {heads} heads, k/v have {kv_heads}: the number of q heads must be a multiple")


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> AttentionLaunch:
    varlen = cu_seqlens_q is not None
    # A window side as wide as the (packed) lengths bounds nothing: -1, so kernel index arithmetic stays in int32.
    lengths = (q.shape[0], k.shape[0]) if varlen else (q.shape[2], k.shape[2])
    window_left, window_right = ops.effective_window(window_left, window_right, *lengths)
    return AttentionLaunch(
        batch=cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0],
        group=q.shape[1] // k.shape[1],
        head_dim=q.shape[-1],
        max_seqlen_q=max_seqlen_q if varlen else q.shape[2],
        max_seqlen_k=max_seqlen_k if varlen else k.shape[2],
        scale=scale,
        softcap=softcap,
        window_left=window_left,
        window_right=window_right,
        dtype=q.dtype,
        key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
    )


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    # The triton 3.9 interpreter multiplies bf16 dot operands as raw bits: compute bf16 in fp32 there.
    return torch.float32 if t.dtype == torch.bfloat16 and not t.is_cuda else t.dtype


def _prep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels need unit stride along the head dim."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Device guard: Triton launches on the current CUDA device (and its current stream), so make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _triton_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *options):
    """The Triton implementation of ``fastllm::attention_fwd`` (same signature and results as the op)."""
    with _on_device(q):
        dtype = _kernel_dtype(q)
        qp, kp, vp = (_prep(t, dtype) for t in (q, k, v))
        params = _launch(qp, kp, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *options)
        decode = not params.varlen and q.shape[2] <= DECODE_MAX_SEQLEN_Q
        out, lse = (attention_decode if decode else attention_forward)(qp, kp, vp, params)
        return ops.laid_out_like(out, q), lse.contiguous()


def _triton_backward(do, q, k, v, out, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *options):
    """The Triton implementation of ``fastllm::attention_bwd``."""
    with _on_device(q):
        dtype = _kernel_dtype(q)
        dop, qp, kp, vp, outp = (_prep(t, dtype) for t in (do, q, k, v, out))
        params = _launch(qp, kp, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *options)
        grads = attention_backward(dop, qp, kp, vp, outp, lse, dlse, params)
        return tuple(ops.laid_out_like(g, t) for g, t in zip(grads, (q, k, v), strict=True))


for _device in ("cuda", "cpu") if INTERPRET else ("cuda",):
    torch.library.register_kernel("fastllm::attention_fwd", _device, _triton_forward)
    torch.library.register_kernel("fastllm::attention_bwd", _device, _triton_backward)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax(scale * q k^T [softcapped, masked]) v, differentiable in q, k and v.

    Args:
        q: (B, H, Sq, D) float16 / bfloat16 / float32, D in {16, 32, 64, 96, 128, 256}.
        k, v: (B, Hkv, Sk, D), same dtype and device; H % Hkv == 0 (GQA / MQA: head h reads h // (H // Hkv)).
        causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned when Sq != Sk, as flash-attn).
        scale: score multiplier, default D ** -0.5.
        key_padding_mask: bool (B, Sk), True = attend to this key.
        window: (left, right) sliding window, query i sees i + Sk - Sq - left <= j <= i + Sk - Sq + right;
            -1 or None leaves that side unbounded. With causal=True the right side is 0.
        softcap: scores = softcap * tanh(scores / softcap) after scaling (Gemma 2).
        return_lse: also return the natural log-sum-exp of the scores, (B, H, Sq) float32 (differentiable).

    Returns:
        out (B, H, Sq, D) in q's dtype, or (out, lse) with ``return_lse``. Rows that see no key give 0
        (lse -inf) and zero gradients.
    """
    _check_qkv(q, k, v, 4, "(B, H, S, D)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: sequence lengths must be >= 1, got Sq={q.shape[2]}, Sk={k.shape[2]}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask: expected shape (B, Sk) = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device}, got {key_padding_mask.device}")
    scale, cap, left, right = _normalise_options(causal, window, softcap, scale, q.shape[-1])
    left, right = ops.effective_window(left, right, q.shape[2], k.shape[2])
    out, lse = torch.ops.fastllm.attention_fwd(q, k, v, key_padding_mask, None, None, 0, 0, scale, left, right, cap)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences, differentiable in q, k and v.

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D); dtypes, head dims and GQA as in ``attention``.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative sequence starts (first 0, last total).
        max_seqlen_q, max_seqlen_k: the longest sequence in q and in k.
        causal, scale, window, softcap: as in ``attention``, applied per sequence (bottom-right aligned
            with that sequence's own lengths).

    Returns:
        out (total_q, H, D) in q's dtype.
    """
    _check_qkv(q, k, v, 3, "(total, H, D)")
    checks = (("q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("k", cu_seqlens_k, k.shape[0], max_seqlen_k))
    for side, cu, total, max_len in checks:
        name = f"cu_seqlens_{side}"
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(f"{name}: expected a 1-D int32 tensor on {q.device}, got {cu!r:.80}")
        if cu.shape[0] != cu_seqlens_q.shape[0] or cu.shape[0] < 2:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must both have length B + 1 >= 2")
        if not torch.compiler.is_compiling():  # value checks read the offsets back to the host
            lengths = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
                raise ValueError(f"{name}: must rise from 0 to the packed length {total}, got {cu.tolist()}")
            if int(lengths.max()) > max_len:
                raise ValueError(
                    f"max_seqlen_{side}={max_len} is shorter than the longest sequence {int(lengths.max())}"
                )
    scale, cap, left, right = _normalise_options(causal, window, softcap, scale, q.shape[-1])
    # the packed lengths bound every sequence's: a window side at least as wide is no bound (and no huge int)
    left, right = ops.effective_window(left, right, q.shape[0], k.shape[0])
    out, _ = torch.ops.fastllm.attention_fwd(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, left, right, cap
    )
    return out
