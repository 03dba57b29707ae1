"""Triton backward of fused attention: a delta pre-pass, a dK/dV kernel and a dQ kernel (no atomics).

With P = softmax(S) recomputed from the saved log-sum-exp (P = exp2(S2 - lse * log2 e)):
    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),  delta_i = rowsum(dO_i * O_i) - dlse_i
    dQ = scale * dS' K,  dK = scale * dS'^T Q,  dS' = dS * (1 - t^2) under softcap (t = tanh), else dS
The dK/dV kernel owns a block of keys of one key/value head and loops over every query head of its GQA
group, so group gradients are summed in registers; the dQ kernel owns a block of queries. Every output
element is written by exactly one program: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET
from .attention_fwd import (
    LOG2E,
    AttentionLaunch,
    Tile,
    aligned_inner,
    autotuned,
    flat_grid,
    head_offset,
    kv_block_range,
    new_row_stats,
    program_tile,
    row_stat_strides,
    scores_log2,
    seq_bounds,
    seq_strides,
    tile_ptrs,
    tile_start,
    two_ranges,
    unmasked_key_range,
    visible,
)

_DELTA_BLOCK = 32 if INTERPRET else 64


@triton.jit
def _attention_delta_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr, cu_seqlens_q,
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    stride_lb, stride_lh,
    n_heads, seqlen_q, total_q, head_dim,
    HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO[i, d] * O[i, d] (fp32) = sum_j P_ij dP_ij, the softmax-Jacobian correction; a
    # gradient flowing into lse_i adds P_ij * dlse_i to dS_ij, which is the same as subtracting it from delta.
    b, h, m0 = program_tile(n_heads, seqlen_q, BLOCK_M)
    q_start, q_len, _, _ = seq_bounds(b, cu_seqlens_q, cu_seqlens_q, seqlen_q, seqlen_q, total_q, total_q, VARLEN)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    o_base = o_ptr + head_offset(b, h, q_start, stride_ob, stride_oh, stride_os)
    do_base = do_ptr + head_offset(b, h, q_start, stride_db, stride_dh, stride_ds)
    o = tl.load(tile_ptrs(o_base, offs_m, stride_os, offs_d), mask=mask, other=0.0)
    do = tl.load(tile_ptrs(do_base, offs_m, stride_ds, offs_d), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stat = head_offset(b, h, q_start, stride_lb, stride_lh, 1) + offs_m
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + stat, mask=row_ok, other=0.0)
    tl.store(delta_ptr + stat, delta, mask=row_ok)


# dK/dV and dQ tile candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), the first one the default; checked on
# sm_90 with ptxas like the forward's (no spills with every mask option on, each default also over the launch
# variants of tests/test_gpu_compile.py; spill-free with triton 3.9's and 3.6's ptxas). The dK/dV kernel keeps K, V,
# dK and dV tiles of BLOCK_N x D live for its whole loop, so wide heads get 8 warps; fp32 inputs get small tiles. Its
# dK += dS^T Q and dV += P^T dO have BLOCK_N rows: BLOCK_N >= 64 lets them run as Hopper wgmma (64-row warpgroup
# MMAs), so the defaults up to D = 128 have it; at D = 256 every such tile spills, so its list keeps 32-row tiles.
# At D = 128, dK/dV tiles of 64 x 64 and of 128 keys spill (with the masks on, or with 3.6's ptxas), 16 or 32 query
# rows by 64 keys do not; dQ gets 8 warps there, its 64 x 64 tile on 4 warps spills with triton 3.6. fp32 takes
# 64-key or 16-row dQ tiles: 32 x 32 and 16 x 32 on 4 warps spill at D = 128 (32 x 32 even at D = 64 with softcap).
_DKDV_TILES = [(64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)]
_DKDV_TILES_D128 = [(16, 64, 8, 2), (32, 64, 8, 2), (16, 64, 8, 1), (64, 32, 8, 2), (128, 32, 8, 2), (32, 32, 4, 1)]
_DKDV_TILES_D256 = [(32, 32, 8, 1), (64, 32, 8, 2), (16, 32, 8, 1), (16, 32, 4, 1)]
_DKDV_TILES_FP32 = [(16, 32, 4, 2), (32, 16, 4, 2)]
_DQ_TILES = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)]
_DQ_TILES_D128 = [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)]
_DQ_TILES_D256 = [(32, 64, 8, 2), (16, 128, 8, 2), (32, 32, 8, 2), (32, 32, 4, 1)]
_DQ_TILES_FP32 = [(16, 64, 8, 1), (16, 64, 4, 2), (32, 16, 8, 2), (16, 16, 8, 2)]
# fp32 at D = 256, dK/dV and dQ: larger tiles, and 4 warps, spill (exact fp32 dots run on FMA units).
_FP32_D256_TILES = [(16, 16, 8, 1), (16, 16, 8, 2)]


def dkdv_tiles(block_d: int, fp32: bool) -> list[Tile]:
    """dK/dV tile candidates for a head-dim bucket (BLOCK_D) and input kind (fp32 or 16-bit)."""
    if block_d >= 256:
        return _FP32_D256_TILES if fp32 else _DKDV_TILES_D256
    if fp32:
        return _DKDV_TILES_FP32
    return _DKDV_TILES if block_d <= 64 else _DKDV_TILES_D128


def dq_tiles(block_d: int, fp32: bool) -> list[Tile]:
    """dQ tile candidates for a head-dim bucket (BLOCK_D) and input kind (fp32 or 16-bit)."""
    if block_d >= 256:
        return _FP32_D256_TILES if fp32 else _DQ_TILES_D256
    if fp32:
        return _DQ_TILES_FP32
    return _DQ_TILES if block_d <= 64 else _DQ_TILES_D128


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, cols, offs_m, offs_d, d_ok,
    q_len, k_len, kpm_row, qk_scale, cap_scale, window_left, window_right, lo, u, w, hi,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dK, dV of this key tile from the query tiles of [lo, hi) of one query head. The tiles of [u, w) see every key
    of the key tile and skip the mask arithmetic; the others test every (row, key) pair and the sequence end.

    One loop with a uniform branch per tile, not the forward's two loops (``two_ranges``): this kernel keeps four
    BLOCK_N x D tiles live for the whole loop (K, V and the fp32 dK, dV accumulators), and a second pipelined loop
    body cost about 50 more registers per thread at D = 128 on sm_90, enough to make ptxas spill."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < q_len  # (load masks only: the score tile of an interior tile is not masked)
        row_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(tile_ptrs(q_base, rows, stride_qs, offs_d), mask=row_mask, other=0.0)
        do = tl.load(tile_ptrs(do_base, rows, stride_dos, offs_d), mask=row_mask, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        # P^T for this tile, recomputed from lse: P^T_ji = exp2(S2^T_ji - lse2_i), 0 where invisible.
        s_t, t_t = scores_log2(tl.dot(k, tl.trans(q), input_precision=PRECISION), qk_scale, cap_scale, SOFTCAP)
        if (m0 < u) | (m0 >= w):
            ok = visible(
                rows[None, :], cols[:, None], q_len, k_len, kpm_row, window_left, window_right,
                HAS_LEFT, HAS_RIGHT, HAS_KPM,
            )  # fmt: skip
            p_t = tl.exp2(tl.where(ok, s_t - lse2[None, :], float("-inf")))
        else:
            p_t = tl.exp2(s_t - lse2[None, :])
        # dV += P^T dO
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        # dS^T = P^T * (V dO^T - delta), times the tanh derivative under softcap; dK += dS^T Q
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    kpm_ptr, kv_lo_ptr, kv_hi_ptr, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_lb, stride_lh,
    stride_kpm,
    n_kv_heads, group, seqlen_q, seqlen_k, total_q, total_k, head_dim,
    scale, qk_scale, cap_scale, window_left, window_right,
    SEQ_BUCKET,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, hkv, n0 = program_tile(n_kv_heads, seqlen_k, BLOCK_N)
    q_start, q_len, k_start, k_len = seq_bounds(
        b, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, total_q, total_k, VARLEN
    )
    if n0 >= k_len:
        return

    # This program's key/value tile stays in registers for the whole loop.
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
    # Masked loads read 0: padded head-dim columns (D = 96 in a 128-wide tile) and rows past the end are zeros.
    k_base = k_ptr + head_offset(b, hkv, k_start, stride_kb, stride_kh, stride_ks)
    v_base = v_ptr + head_offset(b, hkv, k_start, stride_vb, stride_vh, stride_vs)
    k = tl.load(tile_ptrs(k_base, cols, stride_ks, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(tile_ptrs(v_base, cols, stride_vs, offs_d), mask=kv_mask, other=0.0)
    kpm_row = kpm_ptr + b.to(tl.int64) * stride_kpm
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query rows that can see any key of this block (the transpose of the forward's block skipping):
    # j <= i + diag + right  <=>  i >= j - diag - right;  j >= i + diag - left  <=>  i <= j - diag + left.
    diag = k_len - q_len
    n_last = n0 + BLOCK_N - 1
    lo = 0
    hi = q_len
    a = 0  # [a, z): the rows that see every key of this block (the interior, unmasked stage)
    z = q_len
    if HAS_RIGHT:
        lo = tl.maximum(lo, n0 - diag - window_right)
        a = tl.maximum(a, n_last - diag - window_right)
    if HAS_LEFT:
        hi = tl.minimum(hi, n_last - diag + window_left + 1)
        z = tl.minimum(z, n0 - diag + window_left + 1)
    whole = n_last < k_len  # no key of the block past the sequence end
    if HAS_KPM:
        # a block wholly outside this sequence's unpadded key span gets no gradient; one inside its contiguous
        # run of unpadded keys needs no padding test
        outside = (n0 + BLOCK_N <= tl.load(kv_lo_ptr + 2 * b)) | (n0 >= tl.load(kv_hi_ptr + 2 * b))
        hi = tl.where(outside, 0, hi)
        whole = whole & (n0 >= tl.load(kv_lo_ptr + 2 * b + 1)) & (n_last < tl.load(kv_hi_ptr + 2 * b + 1))
    lo = (lo // BLOCK_M) * BLOCK_M
    z = tl.where(whole, z, a)
    u, w = aligned_inner(lo, hi, a, z, BLOCK_M)

    for g in range(group):
        h = hkv * group + g
        q_base = q_ptr + head_offset(b, h, q_start, stride_qb, stride_qh, stride_qs)
        do_base = do_ptr + head_offset(b, h, q_start, stride_dob, stride_doh, stride_dos)
        stat_base = head_offset(b, h, q_start, stride_lb, stride_lh, 1)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_ptr + stat_base, delta_ptr + stat_base, stride_qs, stride_dos,
            cols, offs_m, offs_d, d_ok, q_len, k_len, kpm_row, qk_scale, cap_scale, window_left, window_right,
            lo, u, w, hi, HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_M,
        )  # fmt: skip

    dk_base = dk_ptr + head_offset(b, hkv, k_start, stride_dkb, stride_dkh, stride_dks)
    dv_base = dv_ptr + head_offset(b, hkv, k_start, stride_dvb, stride_dvh, stride_dvs)
    tl.store(tile_ptrs(dk_base, cols, stride_dks, offs_d), (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(tile_ptrs(dv_base, cols, stride_dvs, offs_d), dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
    q_len, k_len, kpm_row, qk_scale, cap_scale, window_left, window_right, r0, r1, s0, s1,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """dQ of this query tile from the key tiles of [r0, r1) and [s0, s1); MASKED as in the forward's ``_fwd_tiles``."""
    first, tiles = two_ranges(r0, r1, s0, s1, BLOCK_N)
    for t in range(0, tiles):
        n0 = tile_start(t, first, r0, s0, BLOCK_N)
        cols = n0 + offs_n
        # unmasked tiles lie inside the sequence: only the head-dim padding is masked
        kv_mask = (cols[:, None] < k_len) & d_ok[None, :] if MASKED else d_ok[None, :]
        k = tl.load(tile_ptrs(k_base, cols, stride_ks, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(v_base, cols, stride_vs, offs_d), mask=kv_mask, other=0.0)
        # P = exp2(S2 - lse2) recomputed for this tile, 0 where invisible.
        s, t = scores_log2(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, cap_scale, SOFTCAP)
        if MASKED:
            ok = visible(
                rows[:, None], cols[None, :], q_len, k_len, kpm_row, window_left, window_right,
                HAS_LEFT, HAS_RIGHT, HAS_KPM,
            )  # fmt: skip
            p = tl.exp2(tl.where(ok, s - lse2[:, None], float("-inf")))
        else:
            p = tl.exp2(s - lse2[:, None])
        # dS = P * (dO V^T - delta) (times the tanh derivative under softcap); dQ += dS K
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    kpm_ptr, kv_lo_ptr, kv_hi_ptr, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    stride_kpm,
    n_heads, group, seqlen_q, seqlen_k, total_q, total_k, head_dim,
    scale, qk_scale, cap_scale, window_left, window_right,
    SEQ_BUCKET,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, h, m0 = program_tile(n_heads, seqlen_q, BLOCK_M)
    q_start, q_len, k_start, k_len = seq_bounds(
        b, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, total_q, total_k, VARLEN
    )
    if m0 >= q_len:
        return

    # This program's query rows, their output gradient, lse and delta stay in registers.
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_mask = (rows[:, None] < q_len) & d_ok[None, :]
    # Masked loads read 0: padded head-dim columns (D = 96 in a 128-wide tile) and rows past the end are zeros.
    q = tl.load(tile_ptrs(q_ptr + head_offset(b, h, q_start, stride_qb, stride_qh, stride_qs), rows, stride_qs, offs_d),
                mask=row_mask, other=0.0)  # fmt: skip
    do_base = do_ptr + head_offset(b, h, q_start, stride_dob, stride_doh, stride_dos)
    do = tl.load(tile_ptrs(do_base, rows, stride_dos, offs_d), mask=row_mask, other=0.0)
    stat = head_offset(b, h, q_start, stride_lb, stride_lh, 1) + rows
    lse2 = tl.load(lse_ptr + stat, mask=rows < q_len, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + stat, mask=rows < q_len, other=0.0)
    k_base = k_ptr + head_offset(b, h // group, k_start, stride_kb, stride_kh, stride_ks)
    v_base = v_ptr + head_offset(b, h // group, k_start, stride_vb, stride_vh, stride_vs)
    kpm_row = kpm_ptr + b.to(tl.int64) * stride_kpm
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The forward's two stages: the interior key tiles without mask arithmetic, then the masked ones around them.
    lo, hi = kv_block_range(
        m0, m0 + BLOCK_M, q_len, k_len, kv_lo_ptr, kv_hi_ptr, b, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_N,
    )  # fmt: skip
    u, w = unmasked_key_range(
        m0, q_len, k_len, lo, hi, kv_lo_ptr, kv_hi_ptr, b, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok, q_len, k_len,
        kpm_row, qk_scale, cap_scale, window_left, window_right, u, w, w, w,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_N, False,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok, q_len, k_len,
        kpm_row, qk_scale, cap_scale, window_left, window_right, lo, u, w, hi,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_N, True,
    )  # fmt: skip

    dq_base = dq_ptr + head_offset(b, h, q_start, stride_dqb, stride_dqh, stride_dqs)
    tl.store(tile_ptrs(dq_base, rows, stride_dqs, offs_d), (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


_dkdv_tuner = autotuned(_attention_dkdv_kernel, dkdv_tiles)
_dq_tuner = autotuned(_attention_dq_kernel, dq_tiles)


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    params: AttentionLaunch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dK/dV and dQ kernels; layouts as in ``attention_forward``. Returns (dq, dk, dv) like q, k, v."""
    n_heads = q.shape[1]
    n_kv_heads = k.shape[1]
    delta = new_row_stats(q, params)
    stat_strides = row_stat_strides(delta, params)
    cu_q, cu_k = params.cu_args(q.device)
    grid = flat_grid(params.max_seqlen_q, _DELTA_BLOCK, params.batch * n_heads, "attention backward")
    _attention_delta_kernel[grid](
        out, do, delta if dlse is None else dlse.contiguous(), delta, cu_q,
        *seq_strides(out, params), *seq_strides(do, params), *stat_strides,
        n_heads, params.max_seqlen_q, params.totals(q, k)[0], params.head_dim,
        HAS_DLSE=dlse is not None, VARLEN=params.varlen, BLOCK_M=_DELTA_BLOCK, BLOCK_D=params.block_d,
    )  # fmt: skip

    dq, dk, dv = params.new_output(q), params.new_output(k), params.new_output(v)
    shared = (
        *params.mask_args(q.device), cu_q, cu_k,
        *seq_strides(q, params), *seq_strides(k, params), *seq_strides(v, params), *seq_strides(do, params),
    )  # fmt: skip
    scalars = (
        params.group, params.max_seqlen_q, params.max_seqlen_k, *params.totals(q, k), params.head_dim,
        params.scale, params.qk_scale, params.cap_scale, params.window_left, params.window_right, params.seq_bucket,
    )  # fmt: skip
    grid_kv = lambda meta: flat_grid(params.max_seqlen_k, meta["BLOCK_N"], params.batch * n_kv_heads, "attention dK/dV")
    _dkdv_tuner(params)[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *shared,
        *seq_strides(dk, params), *seq_strides(dv, params), *stat_strides, params.kpm_stride,
        n_kv_heads, *scalars, **params.flags,
    )  # fmt: skip
    grid_q = lambda meta: flat_grid(params.max_seqlen_q, meta["BLOCK_M"], params.batch * n_heads, "attention dQ")
    _dq_tuner(params)[grid_q](
        q, k, v, do, lse, delta, dq, *shared,
        *seq_strides(dq, params), *stat_strides, params.kpm_stride,
        n_heads, *scalars, **params.flags,
    )  # fmt: skip
    return dq, dk, dv
