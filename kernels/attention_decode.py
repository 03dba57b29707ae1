"""Split-KV decode attention (flash-decoding) for a few query rows (Sq <= ``DECODE_MAX_SEQLEN_Q``) against a long cache.

Decoding runs one (or a few) query rows per sequence against thousands of cached keys. The forward kernel would
run one program per (sequence, query head) with a mostly empty row tile: a few hundred programs streaming the whole
cache each, under one wave of a big GPU. Here the cache is split instead:

1. ``_decode_split_kernel``: one program per (sequence, key/value head, block of query heads, KV split). Its row
   tile packs the Sq query rows of every query head in the block (all heads of a GQA group share the key/value
   head, so each key tile is loaded once for all of them) and runs the forward's online softmax (``_fwd_tiles``,
   same interior and masked stages) over its split of the keys, writing each row's partial running
   max m_s (log2 units), sum l_s and unnormalised accumulator acc_s in fp32.
2. ``_decode_combine_kernel``: one program per (sequence, query head, query row) rescales the partials to the
   common max m = max_s m_s: out = sum_s 2^(m_s - m) acc_s / L, L = sum_s 2^(m_s - m) l_s, lse = (m + log2 L) ln 2.
   A row with no visible key in any split (L = 0) gets out 0 and lse -inf, as in the forward kernel.

Splits are sized so that about two waves of programs fill the GPU. Causal / window / key padding / softcap / GQA
follow the forward's semantics (bottom-right alignment: the cache's last key is the last query's diagonal).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._config import INTERPRET
from .attention_fwd import (
    LN2,
    AttentionLaunch,
    _fwd_tiles,
    head_offset,
    kv_block_range,
    unmasked_key_range,
)

DECODE_MAX_SEQLEN_Q = 16


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr,
    kpm_ptr, kv_lo_ptr, kv_hi_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_kpm,
    n_heads, n_kv_heads, group, seqlen_q, seqlen_k, head_dim, heads_per_block, n_splits, split_len,
    qk_scale, cap_scale, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # program -> (batch b, key/value head hkv, head block, split s), the split varying fastest
    pid = tl.program_id(0)
    head_blocks = tl.cdiv(group, heads_per_block)
    s = pid % n_splits
    rest = pid // n_splits
    g0 = (rest % head_blocks) * heads_per_block
    rest = rest // head_blocks
    hkv = rest % n_kv_heads
    b = rest // n_kv_heads

    # Row r of the tile is query row i = r % Sq of query head hkv * group + g0 + r // Sq.
    r = tl.arange(0, BLOCK_M)
    g = g0 + r // seqlen_q
    qi = r % seqlen_q
    row_ok = (r < heads_per_block * seqlen_q) & (g < group)
    h = hkv * group + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_rows = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qs
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    zero = b * 0
    k_base = k_ptr + head_offset(b, hkv, zero, stride_kb, stride_kh, stride_ks)
    v_base = v_ptr + head_offset(b, hkv, zero, stride_vb, stride_vh, stride_vs)
    kpm_row = kpm_ptr + b.to(tl.int64) * stride_kpm

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The keys all Sq rows may see, cut into the forward's stages, each intersected with this split's keys
    # [s0, s1) (split_len is a multiple of BLOCK_N, so the stages stay tile-aligned).
    lo, hi = kv_block_range(
        zero, zero + seqlen_q, seqlen_q, seqlen_k, kv_lo_ptr, kv_hi_ptr, b, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_N,
    )  # fmt: skip
    u, w = unmasked_key_range(
        zero, seqlen_q, seqlen_k, lo, hi, kv_lo_ptr, kv_hi_ptr, b, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    s0 = s * split_len
    s1 = s0 + split_len
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, qi, offs_n, offs_d, d_ok, seqlen_q, seqlen_k,
        kpm_row, qk_scale, cap_scale, window_left, window_right, tl.maximum(u, s0), tl.minimum(w, s1), s0, s0,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_N, False,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, qi, offs_n, offs_d, d_ok, seqlen_q, seqlen_k,
        kpm_row, qk_scale, cap_scale, window_left, window_right, tl.maximum(lo, s0), tl.minimum(u, s1),
        tl.maximum(w, s0), tl.minimum(hi, s1), HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_N, True,
    )  # fmt: skip

    # Partials: (B, H, n_splits, Sq) for m and l, (B, H, n_splits, Sq, D) for acc, all contiguous fp32.
    part = ((b.to(tl.int64) * n_heads + h) * n_splits + s) * seqlen_q + qi
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * head_dim + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, lse_ptr,
    stride_ob, stride_oh, stride_os,
    n_heads, seqlen_q, head_dim, n_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # program -> (b, h, query row i); its partials are n_splits consecutive entries of stride Sq
    pid = tl.program_id(0)
    i = pid % seqlen_q
    bh = pid // seqlen_q
    b = bh // n_heads
    h = bh % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < head_dim
    part = (bh.to(tl.int64) * n_splits + offs_s) * seqlen_q + i
    m_s = tl.load(m_ptr + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + part, mask=s_ok, other=0.0)
    acc_s = tl.load(acc_ptr + part[:, None] * head_dim + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    # rescale every split to the common max (a split that saw no key has m_s = -inf: weight 0)
    m = tl.max(m_s, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    scale_s = tl.exp2(m_s - m_shift)
    total = tl.sum(scale_s * l_s, 0)
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    out = tl.sum(scale_s[:, None] * acc_s, 0) / total_safe
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_os
    tl.store(o_ptr + o_off + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)
    lse = tl.where(empty, float("-inf"), (m + tl.log2(total_safe)) * LN2)
    tl.store(lse_ptr + bh.to(tl.int64) * seqlen_q + i, lse)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 under the interpreter (so CPU tests split the cache)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_tile(params: AttentionLaunch, seqlen_q: int, interpret: bool = INTERPRET) -> tuple[int, int, int, int]:
    """(query heads per program, BLOCK_M, BLOCK_N, num_warps) of the decode kernel, spill-free on sm_90 with every
    mask option: the row tile packs heads x Sq rows, at least 16 (tl.dot's minimum) and at most 64 (32 at D = 256,
    16 for fp32's exact dots); key tiles of 64 (32 at D = 256; fp32: 32, 16 at D = 256; 32 under the interpreter);
    8 warps once the row tile passes 64 x 64 (fp32: from D = 128)."""
    fp32 = params.dtype == torch.float32
    most = 16 if fp32 else (64 if params.block_d <= 128 else 32)
    heads = max(1, min(params.group, most // seqlen_q))
    block_m = max(16, triton.next_power_of_2(heads * seqlen_q))
    if interpret:
        block_n = 32
    elif fp32:
        block_n = 16 if params.block_d > 128 else 32
    else:
        block_n = 64 if params.block_d <= 128 else 32
    wide = params.block_d >= 128 if fp32 else block_m * params.block_d > 64 * 64
    return heads, block_m, block_n, 8 if wide else 4


def decode_splits(programs: int, seqlen_k: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(number of KV splits, keys per split, a multiple of block_n): enough splits for about two waves of
    ``programs`` x splits programs on the device, never more than one per key tile."""
    tiles = triton.cdiv(seqlen_k, block_n)
    splits = max(1, min(tiles, triton.cdiv(2 * _multiprocessors(device), programs)))
    split_len = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(seqlen_k, split_len), split_len


def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionLaunch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV forward for padded q (B, H, Sq, D) with Sq <= DECODE_MAX_SEQLEN_Q, k/v (B, Hkv, Sk, D).

    Returns (out like q, lse fp32 (B, H, Sq)), the same as ``attention_forward``.
    """
    batch, n_heads, seqlen_q, _ = q.shape
    n_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    if params.varlen or seqlen_q > DECODE_MAX_SEQLEN_Q:
        raise ValueError(f"attention_decode: padded q with Sq <= {DECODE_MAX_SEQLEN_Q} only, got Sq={seqlen_q}")
    heads, block_m, block_n, warps = decode_tile(params, seqlen_q)
    programs = batch * n_kv_heads * triton.cdiv(params.group, heads)
    n_splits, split_len = decode_splits(programs, seqlen_k, block_n, q.device)
    if programs * n_splits > 2**31 - 1:
        raise ValueError(f"attention_decode: {programs} x {n_splits} programs exceed the CUDA grid limit 2^31 - 1")
    stats = torch.empty((2, batch, n_heads, n_splits, seqlen_q), device=q.device, dtype=torch.float32)
    acc = torch.empty((batch, n_heads, n_splits, seqlen_q, params.head_dim), device=q.device, dtype=torch.float32)
    flags = params.flags
    del flags["VARLEN"]
    _decode_split_kernel[(programs * n_splits,)](
        q, k, v, stats[0], stats[1], acc, *params.mask_args(q.device),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), params.kpm_stride,
        n_heads, n_kv_heads, params.group, seqlen_q, seqlen_k, params.head_dim, heads, n_splits, split_len,
        params.qk_scale, params.cap_scale, params.window_left, params.window_right,
        **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2,
    )  # fmt: skip
    out = torch.empty_like(q)
    lse = torch.empty((batch, n_heads, seqlen_q), device=q.device, dtype=torch.float32)
    _decode_combine_kernel[(batch * n_heads * seqlen_q,)](
        stats[0], stats[1], acc, out, lse, out.stride(0), out.stride(1), out.stride(2),
        n_heads, seqlen_q, params.head_dim, n_splits,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=params.block_d, num_warps=4,
    )  # fmt: skip
    return out, lse
