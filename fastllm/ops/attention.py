"""``fastllm::attention_fwd`` / ``fastllm::attention_bwd``: schema, fake, autograd and the CPU implementation.

Masking semantics (flash-attn compatible). With diag = Sk - Sq, query i may see key j when
    window_right >= 0   j <= i + diag + window_right   (causal is window_right = 0: bottom-right aligned)
    window_left >= 0    j >= i + diag - window_left
    key_padding_mask    mask[b, j] is True
A query row that sees no key outputs zeros, has lse = -inf and gets zero gradients (never NaN). Packed sequences
(``cu_seqlens_q/k`` int32 (B + 1,)) apply all of this per sequence; rows of a sequence past ``max_seqlen_q`` (and
keys past ``max_seqlen_k``) are not attended: such rows output zeros with lse -inf.

The op bodies are the CPU implementation; ``fastllm.kernels.attention`` registers the Triton kernels for CUDA (and
for CPU under ``TRITON_INTERPRET=1``, so the CPU tests run the Triton code) on top. On CPU:
- PyTorch's fused CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: what
  ``F.scaled_dot_product_attention`` runs on CPU) for every case it expresses: no mask, causal (``is_causal`` when
  Sq == Sk, an additive mask otherwise), windows and key padding as an additive 0 / -inf mask, GQA (natively, or
  by repeating k and v where the kernel lacks it), packed sequences one sequence at a time. The backward of
  16-bit inputs runs in fp32 where the CPU has no native 16-bit matmul (``fastllm.ops.cpu_matmul``).
- the reference math in fp32 (``fastllm.reference``) where it cannot: softcap, and a backward with a gradient
  flowing into lse.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch

from fastllm import reference
from fastllm.ops.cpu_matmul import matmul_dtype

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def like(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the op's outputs for input t (t's layout when the head dim is unit-stride)."""
    return torch.empty_like(t) if t.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def laid_out_like(result: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """result in t's dtype and in the layout the fake implementations promise (``like(t)``)."""
    target = like(t)
    if result.dtype == t.dtype and result.stride() == target.stride():
        return result
    return target.copy_(result)


def effective_window(left: int, right: int, q_len: int, k_len: int) -> tuple[int, int]:
    """(left, right) with every side that hides no key from any query set to -1 (unbounded).

    With diag = k_len - q_len, the left side hides nothing when left >= k_len - 1 (even the last query's window
    starts at or before key 0), the right side when right >= q_len - 1 (the first query's window reaches the last key).
    Lengths may be upper bounds (the longest packed sequence): the test only gets stricter.
    """
    return (-1 if left >= max(k_len - 1, 0) else left), (-1 if right >= max(q_len - 1, 0) else right)


class _Plan(NamedTuple):
    """How the fused CPU kernel runs one (B, H, Sq, D) x (B, Hkv, Sk, D) case."""

    causal: bool  # the kernel's is_causal (top-left aligned, so only used when Sq == Sk)
    mask: torch.Tensor | None  # additive 0 / -inf mask in q's dtype, broadcastable to (B, H, Sq, Sk)
    sees: torch.Tensor | None  # bool (B or 1, 1, Sq or 1): rows that see some key; None when every row does


def _plan(q: torch.Tensor, k_len: int, kpm: torch.Tensor | None, left: int, right: int) -> _Plan:
    q_len = q.shape[2]
    left, right = effective_window(left, right, q_len, k_len)
    if left < 0 and kpm is None:
        if right < 0:
            return _Plan(False, None, None)
        if right == 0 and q_len == k_len:
            return _Plan(True, None, None)
    if left < 0 and right < 0:  # key padding alone: one (B, 1, 1, Sk) row per sequence
        allowed = kpm[:, None, None, :]
    else:
        allowed = reference.attention_visibility(
            q_len, k_len, window=(left, right), key_padding_mask=kpm, device=q.device
        )
    sees = allowed.any(dim=-1)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return _Plan(False, mask, None if bool(sees.all()) else sees)


@functools.cache
def _native_gqa() -> bool:
    """Whether this PyTorch's fused CPU kernel takes fewer key/value heads than query heads (forward and backward)."""
    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        out, lse = _flash(q, kv, kv)
        _flash_backward(out, q, kv, kv, out, lse, 0.0, False)
    except RuntimeError:
        return False
    return True


def _kv_for_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """k, v as the fused kernel takes them, and the GQA group they were repeated by (1: not repeated)."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or _native_gqa():
        return k, v, 1
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), group


def _unit_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The fused kernel reads rows as unit-stride along the head dim (strided heads silently give wrong results)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _sdpa_forward(q, k, v, kpm, scale, left, right):
    q, k, v = _unit_stride(q, k, v)
    plan = _plan(q, k.shape[2], kpm, left, right)
    kk, vv, _ = _kv_for_kernel(q, k, v)
    out, lse = _flash(q, kk, vv, 0.0, plan.causal, attn_mask=plan.mask, scale=scale)
    if plan.sees is not None:  # the kernel gives such rows out 0 and lse 0: make lse -inf as everywhere else
        out = out.masked_fill(~plan.sees[..., None], 0.0)
        lse = lse.masked_fill(~plan.sees, float("-inf"))
    return out, lse


def _sdpa_backward(do, q, k, v, out, lse, kpm, scale, left, right):
    # 16-bit in fp32 where the CPU lacks native 16-bit matmuls, where PyTorch's 16-bit backward is much slower than
    # its fp32 one (benchmarks/cpu_matmul_dtype.py); the forward, as fast as in fp32 plus casts, keeps the dtype
    compute = matmul_dtype(q.dtype)
    do, q, k, v, out = _unit_stride(*(t.to(compute) for t in (do, q, k, v, out)))
    plan = _plan(q, k.shape[2], kpm, left, right)
    kk, vv, group = _kv_for_kernel(q, k, v)
    # Rows that see no key have lse = -inf; +inf makes the kernel's recomputed P = exp(s - lse) exactly 0 there, so
    # they get zero gradients and add nothing to dk, dv.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    dq, dk, dv = _flash_backward(do, q, kk, vv, out, lse, 0.0, plan.causal, attn_mask=plan.mask, scale=scale)
    if group > 1:
        dk, dv = (g.unflatten(1, (-1, group)).sum(2) for g in (dk, dv))
    return dq, dk, dv


def _reference_forward(q, k, v, kpm, scale, left, right, softcap):
    """The reference math in fp32 (softcap: the fused kernel cannot cap scores)."""
    return reference.attention(
        q, k, v, scale=scale, key_padding_mask=kpm, window=(left, right), softcap=softcap or None, dtype=torch.float32
    )


def _reference_backward(do, q, k, v, out, lse, dlse, kpm, scale, left, right, softcap):
    """dq, dk, dv in fp32 from the saved lse (the formulas of the Triton backward), with a gradient dlse into lse."""
    group = q.shape[1] // k.shape[1]
    qf, kf, vf, dof, of = (t.float() for t in (q, k, v, do, out))
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    raw = (qf @ kf.transpose(-1, -2)) * scale
    tanh = torch.tanh(raw / softcap) if softcap else None
    scores = softcap * tanh if softcap else raw
    allowed = reference.attention_visibility(
        q.shape[2], k.shape[2], window=(left, right), key_padding_mask=kpm, device=q.device
    )
    p = torch.where(allowed, torch.exp(scores - lse[..., None]), 0.0)
    delta = (dof * of).sum(-1) - (0.0 if dlse is None else dlse)
    ds = p * (dof @ vf.transpose(-1, -2) - delta[..., None])
    if softcap:
        ds = ds * (1 - tanh * tanh)
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-1, -2) @ qf) * scale).unflatten(1, (-1, group)).sum(2)
    dv = (p.transpose(-1, -2) @ dof).unflatten(1, (-1, group)).sum(2)
    return dq, dk, dv


def _forward(q, k, v, kpm, scale, left, right, softcap):
    """(B, H, Sq, D) padded layout -> (out, lse fp32 (B, H, Sq))."""
    if softcap:
        return _reference_forward(q, k, v, kpm, scale, left, right, softcap)
    return _sdpa_forward(q, k, v, kpm, scale, left, right)


def _backward(do, q, k, v, out, lse, dlse, kpm, scale, left, right, softcap):
    if softcap or dlse is not None:
        return _reference_backward(do, q, k, v, out, lse, dlse, kpm, scale, left, right, softcap)
    return _sdpa_backward(do, q, k, v, out, lse, kpm, scale, left, right)


def _sequences(
    cu_q: torch.Tensor, cu_k: torch.Tensor, totals: tuple[int, int], longest: tuple[int, int]
) -> Iterator[tuple[slice, slice]]:
    """(rows in q, rows in k) of each packed sequence that has queries and keys: offsets clamped into the packed
    tensors (``totals`` rows), each span cut to ``longest`` = (max_seqlen_q, max_seqlen_k), as the kernels do."""
    offsets = (cu_q.tolist(), cu_k.tolist())
    for b in range(len(offsets[0]) - 1):
        spans = []
        for starts, total, most in zip(offsets, totals, longest, strict=True):
            start = min(max(starts[b], 0), total)
            spans.append(slice(start, max(start, min(starts[b + 1], start + most, total))))
        if spans[0].stop > spans[0].start and spans[1].stop > spans[1].start:
            yield spans[0], spans[1]


def _heads_first(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of a packed (total, H, D) tensor as a (1, H, rows, D) batch of one."""
    return t[rows].transpose(0, 1)[None]


@torch.library.custom_op("fastllm::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T [softcapped, masked]) v and its natural log-sum-exp.

    Padded: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> out like q, lse fp32 (B, H, Sq). Packed (``cu_seqlens_q/k``
    int32 (B + 1,)): q (total_q, H, D), k/v (total_k, Hkv, D) -> out like q, lse fp32 (H, total_q). ``softcap`` 0
    is off; windows as in the module docstring (-1 = unbounded side, causal folded into window_right = 0).
    Validation is the callers' (``fastllm.kernels.attention``).
    """
    options = (scale, window_left, window_right, softcap)
    if cu_seqlens_q is None:
        out, lse = _forward(q, k, v, key_padding_mask, *options)
    else:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        for qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k)):
            o, s = _forward(_heads_first(q, qs), _heads_first(k, ks), _heads_first(v, ks), None, *options)
            out[qs], lse[:, qs] = o[0].transpose(0, 1), s[0]
    return laid_out_like(out, q), lse.contiguous()


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *_):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else q.shape[:3]
    return like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastllm::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) like (q, k, v) from the upstream gradients do (like out) and dlse (like lse, or None), the
    forward's out and lse, and the forward's options."""
    options = (scale, window_left, window_right, softcap)
    if cu_seqlens_q is None:
        grads = _backward(do, q, k, v, out, lse, dlse, key_padding_mask, *options)
    else:
        grads = tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        for qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k)):
            rows = [_heads_first(t, qs) for t in (do, q)] + [_heads_first(t, ks) for t in (k, v)]
            d_lse = None if dlse is None else dlse[:, qs][None]
            dq, dk, dv = _backward(*rows, _heads_first(out, qs), lse[:, qs][None], d_lse, None, *options)
            grads[0][qs], grads[1][ks], grads[2][ks] = (g[0].transpose(0, 1) for g in (dq, dk, dv))
    return tuple(laid_out_like(g, t) for g, t in zip(grads, (q, k, v), strict=True))


@attention_bwd.register_fake
def _(do, q, k, v, *_):
    return like(q), like(k), like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kpm, cu_q, cu_k = inputs[:6]
    ctx.options = inputs[6:]
    # an output nobody used gets None, not zeros: no gradient into lse is the common case (the fused paths)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, *output, kpm, cu_q, cu_k)


def _attention_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, kpm, cu_q, cu_k = ctx.saved_tensors
    if d_out is None:  # only lse was used
        d_out = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(d_out, q, k, v, out, lse, d_lse, kpm, cu_q, cu_k, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_setup_context)
