"""Fused linear + cross-entropy: ``linear_cross_entropy(hidden, weight, labels)`` never holds the (T, V) logits.

The op ``fastllm::linear_cross_entropy`` (``fastllm.ops.linear_cross_entropy``) walks the tokens in chunks whose
logits stay about the size of the hidden states; each chunk's logits come from one matmul (cuBLAS for a dense
weight, ``nf4_matmul``'s Triton kernel with the NF4 weight dequantized in registers), and the row pass below turns
them into per-token losses and, in place, into d loss / d logits, from which grad_hidden = dlogits @ W
(``nf4_matmul_t`` for NF4) and grad_W += dlogits^T @ hidden follow. This module holds the Triton row pass and
registers it for CUDA (and for CPU under ``TRITON_INTERPRET=1``), plus the validating public function.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
import triton
import triton.language as tl

from fastllm.nf4 import FLOAT_DTYPES, NF4Weight
from fastllm.ops import linear_cross_entropy as ops

from ._config import INTERPRET
from .nf4_api import check_weight

# (vocabulary entries per block of the row pass, warps per row program). The interpreter takes small blocks so tests
# cross several of them. The GPU config compiles for sm_90 without register spills (tests/test_gpu_compile.py).
GPU_ROW_CONFIG = (4096, 8)
ROW_BLOCK_V, ROW_WARPS = (128, 1) if INTERPRET else GPU_ROW_CONFIG
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _capped(x, cap, SOFTCAP: tl.constexpr):
    # Gemma 2's final logit softcapping z = cap * tanh(x / cap), with tanh(u) = 1 - 2 / (exp(2u) + 1), which
    # saturates cleanly to +-1 for large |u|.
    if SOFTCAP:
        return cap * (1.0 - 2.0 / (tl.exp(x * (2.0 / cap)) + 1.0))
    else:
        return x


@triton.jit
def _rows_kernel(
    logits_ptr,
    labels_ptr,
    scale_ptr,
    losses_ptr,
    V,
    ignore_index,
    smoothing,
    cap,
    HAS_SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per row (token) of a contiguous (R, V) chunk of logits.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    acc_ty: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    offs = tl.arange(0, BLOCK_V)

    # Pass 1 over the V blocks: the online log-sum-exp of z = softcap(logits): a running max m and the running sum
    # s of exp(z - m), rescaled by exp(m_old - m_new) whenever the max grows; plus sum_v z_v for label smoothing.
    m = tl.full((), float("-inf"), acc_ty)
    s = tl.zeros((), acc_ty)
    z_sum = tl.zeros((), acc_ty)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + offs < V
        z = _capped(tl.load(row_ptr + v0 + offs, mask=mask, other=0.0).to(acc_ty), cap, SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)

    # loss = lse - (1 - eps) z_y - eps * mean_v z_v, 0 for an ignored token (its label is never read).
    in_range = valid & (label >= 0) & (label < V)
    z_y = _capped(tl.load(row_ptr + label, mask=in_range, other=0.0).to(acc_ty), cap, SOFTCAP)
    loss = lse - (1.0 - smoothing) * z_y
    if SMOOTHING:
        loss -= smoothing * z_sum / V
    tl.store(losses_ptr + row, tl.where(valid, loss, 0.0))

    # Pass 2 (gradients): d loss / d logits = (softmax(z) - (1 - eps) onehot(y) - eps / V) * dz/dlogits, with
    # dz/dlogits = 1 - (z / cap)^2 under softcapping, times the row's weight (0 for an ignored token), written
    # over the logits block it was computed from.
    if GRAD:
        weight = tl.where(valid, 1.0, 0.0).to(acc_ty)
        if HAS_SCALE:
            weight *= tl.load(scale_ptr + row).to(acc_ty)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + offs < V
            z = _capped(tl.load(row_ptr + v0 + offs, mask=mask, other=0.0).to(acc_ty), cap, SOFTCAP)
            d = tl.exp(z - lse) - tl.where(v0 + offs == label, 1.0 - smoothing, 0.0)
            if SMOOTHING:
                d -= smoothing / V
            if SOFTCAP:
                d *= 1.0 - (z / cap) * (z / cap)
            tl.store(row_ptr + v0 + offs, (d * weight).to(logits_ptr.dtype.element_ty), mask=mask)


def rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row pass (``fastllm.ops.linear_cross_entropy.RowsFn``) as one Triton program per row; dlogits are
    written over ``logits`` (contiguous (R, V))."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=ops.accumulation_dtype(logits.dtype), device=logits.device)
    if rows:
        _rows_kernel[(rows,)](
            logits, labels, row_scale if row_scale is not None else losses, losses, vocab, ignore_index,
            float(label_smoothing), float(softcap or 1.0),
            HAS_SCALE=row_scale is not None, SOFTCAP=softcap is not None, SMOOTHING=label_smoothing != 0.0,
            GRAD=grad, BLOCK_V=ROW_BLOCK_V, num_warps=ROW_WARPS,
        )  # fmt: skip
    return losses, logits if grad else None


def _guard(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _triton_forward(hidden, *args):
    with _guard(hidden):
        return ops.forward(rows_triton, hidden, *args)


def _triton_backward(hidden, *args):
    with _guard(hidden):
        return ops.backward(rows_triton, hidden, *args)


for _device in ("cuda", "cpu") if INTERPRET else ("cuda",):
    torch.library.register_kernel("fastllm::linear_cross_entropy", _device)(_triton_forward)
    torch.library.register_kernel("fastllm::linear_cross_entropy_backward", _device)(_triton_backward)


# ---- public API ---------------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _name(x: object) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_args(hidden, weight, labels, bias, reduction, label_smoothing, softcap, num_items) -> tuple[int, int]:
    # (V, H) after checking every argument; raises TypeError / ValueError naming the bad one.
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise TypeError(f"hidden must be a float16/bfloat16/float32/float64 tensor, got {_name(hidden)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a 0-d tensor")
    if isinstance(weight, NF4Weight):
        vocab, width = check_weight(weight)
        if hidden.dtype not in FLOAT_DTYPES:
            raise TypeError(f"hidden must be float16/bfloat16/float32 with an NF4 weight, got {hidden.dtype}")
    elif isinstance(weight, torch.Tensor):
        if weight.dim() != 2 or weight.dtype != hidden.dtype:
            raise ValueError(
                f"weight must be (V, H) in hidden's dtype {hidden.dtype}, got {weight.dtype} {tuple(weight.shape)}"
            )
        vocab, width = weight.shape
    else:
        raise TypeError(f"weight must be a torch.Tensor or a fastllm.nf4.NF4Weight, got {type(weight).__name__}")
    if hidden.shape[-1] != width or hidden.device != weight.device:
        raise ValueError(
            f"hidden must be (..., {width}) on {weight.device} like weight, "
            f"got {tuple(hidden.shape)} on {hidden.device}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {_name(labels)}")
    if labels.shape != hidden.shape[:-1] or labels.device != hidden.device:
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} on {hidden.device} (hidden's leading dims), "
            f"got {tuple(labels.shape)} on {labels.device}"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor)
        or bias.shape != (vocab,)
        or bias.dtype != hidden.dtype
        or bias.device != hidden.device
    ):
        raise ValueError(f"bias must be a ({vocab},) tensor in {hidden.dtype} on {hidden.device}, got {bias!r:.80}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or softcap <= 0):
        raise ValueError(f"softcap must be None or a positive float, got {softcap!r}")
    if num_items is not None:
        if reduction != "mean":
            raise ValueError(f"num_items replaces the mean's denominator: it needs reduction='mean', got {reduction!r}")
        if not isinstance(num_items, (numbers.Real, torch.Tensor)):
            raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
        if isinstance(num_items, numbers.Real) and num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items!r}")
    return vocab, width


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``labels``, never holding the logits.

    Same value as ``F.cross_entropy(logits.float(), labels, ignore_index=..., reduction=...,
    label_smoothing=...)`` with, when ``softcap`` is set, ``logits = softcap * tanh(logits / softcap)`` first (Gemma 2's
    final logit softcapping). Memory: the logits of one chunk of tokens (about the size of ``hidden``) at a time.

    Args:
        hidden: (..., H) float16 / bfloat16 / float32 / float64 (T = the product of the leading dims).
        weight: (V, H) dense tensor in hidden's dtype, or an NF4 weight of shape (V, H) (float16/bfloat16/float32
            hidden only; it is frozen and gets no gradient).
        labels: (...) int64 (or int32) token ids in [0, V), or ``ignore_index``; the shape of hidden's leading dims.
        bias: optional (V,) in hidden's dtype.
        ignore_index: label of tokens that contribute nothing (loss 0, gradient 0).
        reduction: "mean" (over the tokens not ignored: NaN when all are), "sum", or "none" (per-token losses with
            the shape of ``labels``; ignored tokens 0).
        label_smoothing: eps in [0, 1]: the target is (1 - eps) one-hot + eps / V, as in ``F.cross_entropy``.
        softcap: None, or the cap c > 0 applied to the logits as c * tanh(logits / c).
        num_items: with reduction "mean", the divisor of the summed loss instead of the count of tokens not ignored
            (transformers' ``num_items_in_batch`` under gradient accumulation); a number or a tensor.
    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or per-token with reduction "none".
        Differentiable in ``hidden``, and in ``weight`` / ``bias`` when they require grad.
    """
    vocab, width = _check_args(hidden, weight, labels, bias, reduction, label_smoothing, softcap, num_items)
    shape = labels.shape
    hidden = hidden.reshape(-1, width).contiguous()
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if isinstance(weight, NF4Weight):
        tensors = (weight.data, weight.absmax, weight.nested_absmax, weight.offset, weight.blocksize)
        weight_grad = False
    else:
        tensors = (weight.contiguous(), None, None, None, 0)
        weight_grad = weight.requires_grad
    grad = torch.is_grad_enabled()
    flags = (grad and hidden.requires_grad, grad and weight_grad, grad and bias is not None and bias.requires_grad)
    reduce = reduction != "none"
    loss = ops.linear_cross_entropy_op(
        hidden, *tensors, vocab, bias, labels, int(ignore_index), float(label_smoothing),
        None if softcap is None else float(softcap), reduce, *flags,
    )[0]  # fmt: skip
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss
    if num_items is not None:
        return loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
    return loss / (labels != ignore_index).sum()
