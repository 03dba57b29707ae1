"""Triton forward of fused attention (flash-attention style), plus the tile helpers the backward shares.

One program owns BLOCK_M query rows of one (sequence, head). It streams over the key/value blocks that
can be visible to those rows and keeps a running ("online") softmax, so the Sq x Sk score matrix never
leaves registers. Scores are kept in base-2 units: exp(x) = exp2(x * log2(e)), and log2(e) is folded into
the scale so each score costs one multiply before exp2.

Visibility of key j to query i (diag = Sk - Sq, bottom-right alignment as flash-attn):
    HAS_LEFT  -> j >= i + diag - window_left
    HAS_RIGHT -> j <= i + diag + window_right       (causal is window_right = 0)
    HAS_KPM   -> key_padding_mask[b, j]
Only plain pointer arithmetic is used (no tl.make_block_ptr) so the kernels run on triton 3.6 and 3.9 and
under TRITON_INTERPRET=1. Offsets of a (sequence, head) and of rows are int64, so tensors past 2^31 elements
work; batch x heads is folded into grid axis 0 (see ``flat_grid``), so it may exceed CUDA's 65535 of axis 1.

Autotuning: each kernel has GPU tile candidates per head-dim bucket and input kind (16-bit or fp32), the first
the default, which ``FASTLLM_AUTOTUNE=0`` launches alone (see ``_config``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._config import tuning_candidates

# log2(e) and ln(2), as compile-time constants the kernels can read (scores live in base-2 units).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of one autotune candidate.
Tile = tuple[int, int, int, int]


def tile_configs(tiles: list[Tile]) -> list[triton.Config]:
    """Tile tuples -> autotune configs: one small tile under the interpreter, the first (default) tile alone when
    FASTLLM_AUTOTUNE=0, else all of them."""
    tiles = tuning_candidates(tiles, (32, 32, 4, 1))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def autotuned(
    kernel: triton.JITFunction, tiles: Callable[[int, bool], list[Tile]]
) -> Callable[[AttentionLaunch], triton.runtime.Autotuner]:
    """``kernel`` autotuned over ``tiles(block_d, fp32)``: one autotuner per head-dim bucket and dtype kind, built
    on first use, each tuning once per mask kind and sequence-length bucket (and tensor dtypes)."""

    @functools.cache
    def for_bucket(block_d: int, fp32: bool) -> triton.runtime.Autotuner:
        key = ["HAS_LEFT", "HAS_RIGHT", "HAS_KPM", "SOFTCAP", "VARLEN", "SEQ_BUCKET"]
        return triton.autotune(configs=tile_configs(tiles(block_d, fp32)), key=key)(kernel)

    return lambda params: for_bucket(params.block_d, params.dtype == torch.float32)


def flat_grid(rows: int, block: int, heads: int, what: str) -> tuple[int]:
    """1-D launch grid of cdiv(rows, block) row tiles for each of ``heads`` (batch x head) pairs.

    The kernels split program_id(0) back into (head pair, row tile) with the row tile varying fastest, so
    programs running together share one head's keys and values in L2. Axis 0 takes up to 2^31 - 1
    programs (axes 1 and 2 only 65535), so any batch x heads fits unless the product itself is too large.
    """
    programs = triton.cdiv(rows, block) * heads
    if programs > 2**31 - 1:
        raise ValueError(
            f"{what}: {heads} (batch x heads) x {triton.cdiv(rows, block)} row tiles = {programs} programs exceeds "
            f"the CUDA grid limit 2^31 - 1; split the batch"
        )
    return (programs,)


@triton.jit
def seq_bounds(b, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, total_q, total_k, VARLEN: tl.constexpr):
    """(start row, length) of sequence b in q and in k: packed offsets when VARLEN, else the padded sizes.

    Packed offsets are clamped into the packed tensors (``total_q`` / ``total_k`` rows) and lengths cut to
    ``seqlen_q`` / ``seqlen_k`` (max_seqlen), so offsets the host could not check (under torch.compile) never make
    a program read or write out of bounds; rows cut off are left to the zero-filled outputs.
    """
    if VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(cu_seqlens_q + b), 0), total_q)
        q_end = tl.minimum(tl.maximum(tl.load(cu_seqlens_q + b + 1), q_start), total_q)
        k_start = tl.minimum(tl.maximum(tl.load(cu_seqlens_k + b), 0), total_k)
        k_end = tl.minimum(tl.maximum(tl.load(cu_seqlens_k + b + 1), k_start), total_k)
        q_len = tl.minimum(q_end - q_start, seqlen_q)
        k_len = tl.minimum(k_end - k_start, seqlen_k)
    else:
        q_start = b * 0  # a tensor, like the loaded offsets
        q_len = seqlen_q
        k_start = b * 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def program_tile(n_heads, rows, BLOCK: tl.constexpr):
    """(batch, head, first row) of this program in ``flat_grid`` order: the row tiles of one head are consecutive."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(rows, BLOCK)
    pid_bh = pid // tiles
    return pid_bh // n_heads, pid_bh % n_heads, (pid % tiles) * BLOCK


@triton.jit
def head_offset(b, h, start, stride_b, stride_h, stride_s):
    """b * stride_b + h * stride_h + start * stride_s in int64 (no 32-bit overflow on huge tensors)."""
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_s


@triton.jit
def tile_ptrs(base, rows, stride_s, offs_d):
    """Pointers of the (rows, head dim) tile below ``base``, with int64 row offsets."""
    return base + rows[:, None].to(tl.int64) * stride_s + offs_d[None, :]


@triton.jit
def visible(
    qi,
    kj,
    q_len,
    k_len,
    kpm_row,
    window_left,
    window_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    """Boolean tile: may query qi see key kj?  qi and kj are broadcastable index tiles (either orientation)."""
    diag = k_len - q_len
    ok = (qi < q_len) & (kj < k_len)
    if HAS_LEFT:
        ok = ok & (kj >= qi + diag - window_left)
    if HAS_RIGHT:
        ok = ok & (kj <= qi + diag + window_right)
    if HAS_KPM:
        # the padding mask is a uint8 row of this sequence; out-of-range keys read 0 (= padded)
        ok = ok & (tl.load(kpm_row + kj, mask=kj < k_len, other=0) != 0)
    return ok


@triton.jit
def scores_log2(qk, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Raw dot products -> scores in log2 units, plus t = tanh(.) of the softcap (1 when not capping).

    Without softcap: s2 = qk * (scale * log2 e).
    With softcap c:  s = c * tanh(scale * qk / c), so s2 = tanh(qk * (scale / c)) * (c * log2 e);
                     tanh(x) = 1 - 2 / (exp(2x) + 1) saturates cleanly to +-1 for large |x|.
    The backward needs ds/dqk = scale * (1 - t^2), hence t is returned.
    """
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp2(qk * (qk_scale * 2.0 * LOG2E)) + 1.0)
        s2 = t * cap_scale
    else:
        t = tl.full(qk.shape, 1.0, tl.float32)  # unused by callers (dead code for the compiler)
        s2 = qk * qk_scale
    return s2, t


@triton.jit
def kv_block_range(
    m_lo,
    m_hi,
    q_len,
    k_len,
    kv_lo_ptr,
    kv_hi_ptr,
    b,
    window_left,
    window_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """[lo, hi) of the key columns any of the query rows [m_lo, m_hi) can see, lo rounded down to BLOCK_N.

    Block skipping: keys left of the window of the first row, right of the causal/window edge of the last
    row, or outside the first..last unpadded key of this sequence are never loaded.
    """
    diag = k_len - q_len
    lo = 0
    hi = k_len
    if HAS_LEFT:
        lo = tl.maximum(lo, m_lo + diag - window_left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_hi - 1 + diag + window_right + 1)
    if HAS_KPM:
        lo = tl.maximum(lo, tl.load(kv_lo_ptr + 2 * b))
        hi = tl.minimum(hi, tl.load(kv_hi_ptr + 2 * b))
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def aligned_inner(lo, hi, a, z, BLOCK: tl.constexpr):
    """Split the tile loop over [lo, hi) (lo a multiple of BLOCK) at the whole tiles inside [a, z): returns (u, w),
    both multiples of BLOCK with lo <= u <= w, such that tiles [lo, u) and [w, hi) hold every tile that is not wholly
    inside [a, z) (the masked stages) and [u, w) only tiles that are (the unmasked stage)."""
    z = tl.maximum(tl.minimum(z, hi), lo)
    a = tl.minimum(tl.maximum(a, lo), z)  # lo <= a <= z <= hi, all >= 0: // rounds down
    u = (a + BLOCK - 1) // BLOCK * BLOCK
    w = tl.maximum(z // BLOCK * BLOCK, u)
    return u, w


@triton.jit
def two_ranges(r0, r1, s0, s1, BLOCK: tl.constexpr):
    """(tiles of [r0, r1), tiles of both): the tile ranges [r0, r1) (its length a multiple of BLOCK, or <= 0) and
    [s0, s1) walked as one loop ``for t in range(0, total)`` with ``tile_start``: the two masked stages share one
    loop body, which keeps register pressure at two loop bodies per kernel (masked + interior)."""
    first = tl.maximum(r1 - r0, 0) // BLOCK
    return first, first + tl.cdiv(tl.maximum(s1 - s0, 0), BLOCK)


@triton.jit
def tile_start(t, first, r0, s0, BLOCK: tl.constexpr):
    """Start of tile t of ``two_ranges``."""
    return tl.where(t < first, r0 + t * BLOCK, s0 + (t - first) * BLOCK)


@triton.jit
def unmasked_key_range(
    m0,
    q_len,
    k_len,
    lo,
    hi,
    kv_lo_ptr,
    kv_hi_ptr,
    b,
    window_left,
    window_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Interior key tiles of the row tile [m0, m0 + BLOCK_M): the (u, w) of ``aligned_inner`` for the keys every
    valid row of the tile sees. Key j is seen by all rows m0..m_last when j < k_len, j <= m0 + diag + right (the
    first row's right edge), j >= m_last + diag - left (the last row's left edge) and j lies in the sequence's
    contiguous run of unpadded keys (``kv_lo_ptr[2b + 1]``..``kv_hi_ptr[2b + 1]``, empty when the padding has holes).
    """
    diag = k_len - q_len
    a = lo
    z = k_len
    if HAS_LEFT:
        a = tl.maximum(a, tl.minimum(m0 + BLOCK_M, q_len) - 1 + diag - window_left)
    if HAS_RIGHT:
        z = tl.minimum(z, m0 + diag + window_right + 1)
    if HAS_KPM:
        a = tl.maximum(a, tl.load(kv_lo_ptr + 2 * b + 1))
        z = tl.minimum(z, tl.load(kv_hi_ptr + 2 * b + 1))
    return aligned_inner(lo, hi, a, z, BLOCK_N)


@dataclass
class AttentionLaunch:
    """Options of one attention call, normalised for the kernels (shared by forward and backward launches).

    window_left / window_right are -1 for an unbounded side; causal is already folded into window_right.
    """

    batch: int
    group: int
    head_dim: int
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    softcap: float  # 0.0 = off
    window_left: int
    window_right: int
    dtype: torch.dtype
    key_padding_mask: torch.Tensor | None = None  # bool (B, Sk)
    cu_seqlens_q: torch.Tensor | None = None  # int32 (B + 1,)
    cu_seqlens_k: torch.Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def has_left(self) -> bool:
        return self.window_left >= 0

    @property
    def has_right(self) -> bool:
        return self.window_right >= 0

    @property
    def has_kpm(self) -> bool:
        return self.key_padding_mask is not None

    @property
    def has_softcap(self) -> bool:
        return self.softcap > 0.0

    @property
    def qk_scale(self) -> float:
        """Multiplier of the raw dot product: scale * log2(e), or scale / softcap (inside the tanh)."""
        return self.scale / self.softcap if self.has_softcap else self.scale * LOG2E.value

    @property
    def cap_scale(self) -> float:
        """Multiplier of tanh(.) when soft-capping: softcap * log2(e)."""
        return self.softcap * LOG2E.value if self.has_softcap else 1.0

    @property
    def block_d(self) -> int:
        return triton.next_power_of_2(self.head_dim)

    @property
    def precision(self) -> str:
        """fp32 inputs get exact fp32 dots; 16-bit inputs use the tensor-core default."""
        return "ieee" if self.dtype == torch.float32 else "tf32"

    @property
    def seq_bucket(self) -> int:
        """Autotune key: the longer sequence length rounded up to a power of two."""
        return triton.next_power_of_2(max(self.max_seqlen_q, self.max_seqlen_k, 1))

    @property
    def kpm_stride(self) -> int:
        return self.key_padding_mask.shape[1] if self.has_kpm else 0

    def mask_args(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(padding mask as uint8, key starts, key ends), or dummies without a padding mask.

        Starts and ends are int32 (B, 2): column 0 spans the first..last unpadded key of each sequence (block
        skipping), column 1 the same span when every key inside it is unpadded and an empty one otherwise (the
        keys whose tiles need no padding test). Computed on the device: no host sync.
        """
        if not self.has_kpm:
            dummy = torch.zeros(2, device=device, dtype=torch.int32)
            return dummy.view(torch.uint8), dummy, dummy
        mask = self.key_padding_mask.contiguous()  # the kernels index row b at b * kpm_stride
        cols = torch.arange(mask.shape[1], device=device, dtype=torch.int32)
        kv_lo = torch.where(mask, cols, mask.shape[1]).amin(dim=1).to(torch.int32)
        kv_hi = torch.where(mask, cols + 1, 0).amax(dim=1).to(torch.int32)
        dense = mask.sum(dim=1, dtype=torch.int32) == kv_hi - kv_lo
        starts = torch.stack([kv_lo, kv_lo], dim=1)
        ends = torch.stack([kv_hi, torch.where(dense, kv_hi, kv_lo)], dim=1)
        return mask.view(torch.uint8), starts, ends

    def totals(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
        """Rows of packed q and k (the kernels clamp packed offsets into them); unused (0) when padded."""
        return (q.shape[0], k.shape[0]) if self.varlen else (0, 0)

    def new_output(self, like: torch.Tensor) -> torch.Tensor:
        """An output buffer like ``like``: zero-filled when packed, where rows past a sequence's max_seqlen are
        written by no program (see ``seq_bounds``), else uninitialised (every element is written)."""
        return torch.zeros_like(like) if self.varlen else torch.empty_like(like)

    @property
    def flags(self) -> dict[str, bool | str | int]:
        """The compile-time (tl.constexpr) launch options every attention kernel but the delta pre-pass takes."""
        return dict(
            HAS_LEFT=self.has_left, HAS_RIGHT=self.has_right, HAS_KPM=self.has_kpm, SOFTCAP=self.has_softcap,
            VARLEN=self.varlen, PRECISION=self.precision, BLOCK_D=self.block_d,
        )  # fmt: skip

    def cu_args(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cu_seqlens_k) unit-stride (the kernels read entry b at offset b), or dummies."""
        if self.varlen:
            return self.cu_seqlens_q.contiguous(), self.cu_seqlens_k.contiguous()
        dummy = torch.zeros(1, device=device, dtype=torch.int32)
        return dummy, dummy


# Forward tile candidates, the first one the default. Each was compiled for sm_90 with every mask option on and
# checked with ptxas: no register spills, shared memory within 227 KB (tests/test_gpu_compile.py, triton 3.9; the
# lists were also checked spill-free with triton 3.6's ptxas). Wide heads and fp32 ("ieee" dots, twice the bytes per
# element) get small tiles. At D = 256, 64 x 64 tiles (any warps or stages) and 32 x 64 on 4 warps spill, so that
# list has 128 x 32, 64 x 32 and 32 x 64 on 8 warps. fp32 at D = 256 has one tile: each other 16/32-row tile tried
# (2 to 8 warps, 1 or 2 stages) spills with one of the two ptxas versions (exact fp32 dots run on FMA units).
_FWD_TILES = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2)]
_FWD_TILES_D256 = [(128, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 1)]
_FWD_TILES_FP32 = [(16, 64, 4, 2), (16, 32, 8, 1), (32, 16, 8, 2), (16, 16, 8, 1)]
_FWD_TILES_FP32_D256 = [(16, 16, 4, 1)]


def forward_tiles(block_d: int, fp32: bool) -> list[Tile]:
    """Forward tile candidates for a head-dim bucket (BLOCK_D) and input kind (fp32 or 16-bit)."""
    if block_d >= 256:
        return _FWD_TILES_FP32_D256 if fp32 else _FWD_TILES_D256
    return _FWD_TILES_FP32 if fp32 else _FWD_TILES


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d, d_ok,
    q_len, k_len, kpm_row, qk_scale, cap_scale, window_left, window_right, r0, r1, s0, s1,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (acc, l_i, m_i) over the key tiles of [r0, r1) and [s0, s1). MASKED tiles (diagonal,
    window edge, padding, sequence end) test every (row, key) pair; unmasked ones are wholly visible and skip that."""
    first, tiles = two_ranges(r0, r1, s0, s1, BLOCK_N)
    for t in range(0, tiles):
        n0 = tile_start(t, first, r0, s0, BLOCK_N)
        cols = n0 + offs_n
        # unmasked tiles lie inside the sequence: only the head-dim padding is masked
        kv_mask = (cols[:, None] < k_len) & d_ok[None, :] if MASKED else d_ok[None, :]
        k = tl.load(tile_ptrs(k_base, cols, stride_ks, offs_d), mask=kv_mask, other=0.0)
        # S = Q K^T for this tile (fp32 accumulate), scaled into log2 units.
        s, _ = scores_log2(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, cap_scale, SOFTCAP)
        if MASKED:
            # invisible entries -> -inf; a row that has seen nothing yet keeps max -inf, so shift it by 0 instead
            # (exp2(-inf - 0) = 0) to avoid -inf - -inf = NaN.
            ok = visible(
                offs_m[:, None], cols[None, :], q_len, k_len, kpm_row, window_left, window_right,
                HAS_LEFT, HAS_RIGHT, HAS_KPM,
            )  # fmt: skip
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every score of the tile is
            m_shift = m_new
        p = tl.exp2(s - m_shift[:, None])
        # Rescale the old sum and accumulator from the old max to the new one, then add this tile.
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(tile_ptrs(v_base, cols, stride_vs, offs_d), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    kpm_ptr, kv_lo_ptr, kv_hi_ptr, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_kpm,
    n_heads, group, seqlen_q, seqlen_k, total_q, total_k, head_dim,
    qk_scale, cap_scale, window_left, window_right,
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

    # Base pointers of this (sequence, head); query head h reads key/value head h // group (GQA / MQA).
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_base = q_ptr + head_offset(b, h, q_start, stride_qb, stride_qh, stride_qs)
    k_base = k_ptr + head_offset(b, h // group, k_start, stride_kb, stride_kh, stride_ks)
    v_base = v_ptr + head_offset(b, h // group, k_start, stride_vb, stride_vh, stride_vs)
    kpm_row = kpm_ptr + b.to(tl.int64) * stride_kpm

    # Masked loads read 0: padded head-dim columns (D = 96 in a 128-wide tile) and rows past the end are zeros.
    row_ok = offs_m < q_len
    q = tl.load(tile_ptrs(q_base, offs_m, stride_qs, offs_d), mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Online softmax state per row: running max m_i (log2 units), running sum l_i of exp2(s - m_i), and the
    # unnormalised output acc = sum_j exp2(s_j - m_i) v_j, all in fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key tiles in two stages (FlashAttention-2's split): the interior tiles [u, w) every row of this tile sees whole
    # (no mask arithmetic), then the masked ones on either side: [lo, u) left of it (window's left edge, padding) and
    # [w, hi) right of it (causal diagonal / window's right edge, padding, the sequence's last partial tile).
    lo, hi = kv_block_range(
        m0, m0 + BLOCK_M, q_len, k_len, kv_lo_ptr, kv_hi_ptr, b, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_N,
    )  # fmt: skip
    u, w = unmasked_key_range(
        m0, q_len, k_len, lo, hi, kv_lo_ptr, kv_hi_ptr, b, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d, d_ok, q_len, k_len, kpm_row,
        qk_scale, cap_scale, window_left, window_right, u, w, w, w,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_N, False,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d, d_ok, q_len, k_len, kpm_row,
        qk_scale, cap_scale, window_left, window_right, lo, u, w, hi,
        HAS_LEFT, HAS_RIGHT, HAS_KPM, SOFTCAP, PRECISION, BLOCK_N, True,
    )  # fmt: skip

    # O = acc / l; lse = (m + log2 l) * ln 2 in natural units. A row that saw no key has l = 0:
    # it outputs zeros and lse = -inf (the backward then gives it zero gradients).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = o_ptr + head_offset(b, h, q_start, stride_ob, stride_oh, stride_os)
    tl.store(
        tile_ptrs(o_base, offs_m, stride_os, offs_d),
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(lse_ptr + head_offset(b, h, q_start, stride_lb, stride_lh, 1) + offs_m, lse, mask=row_ok)


_forward_tuner = autotuned(_attention_fwd_kernel, forward_tiles)


def seq_strides(t: torch.Tensor, params: AttentionLaunch) -> tuple[int, int, int]:
    """(batch, head, sequence) strides of q/k/v/o-like tensors: (B, H, S, D) padded or (total, H, D) packed."""
    if params.varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def new_row_stats(q: torch.Tensor, params: AttentionLaunch, fill: float | None = None) -> torch.Tensor:
    """An fp32 per-query-row buffer (lse, delta): (B, H, Sq) padded or (H, total_q) packed; packed ones are filled
    with ``fill`` when given (rows past a sequence's max_seqlen are written by no program)."""
    shape = (q.shape[1], q.shape[0]) if params.varlen else q.shape[:3]
    if params.varlen and fill is not None:
        return torch.full(shape, fill, device=q.device, dtype=torch.float32)
    return torch.empty(shape, device=q.device, dtype=torch.float32)


def row_stat_strides(t: torch.Tensor, params: AttentionLaunch) -> tuple[int, int]:
    """(batch, head) strides of a per-row buffer from ``new_row_stats`` (rows are contiguous)."""
    if params.varlen:
        return 0, t.stride(0)
    return t.stride(0), t.stride(1)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: AttentionLaunch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Padded layout q (B, H, Sq, D) or packed q (total_q, H, D) when varlen.

    Returns (out like q, lse fp32: (B, H, Sq) padded or (H, total_q) packed).
    """
    out = params.new_output(q)
    lse = new_row_stats(q, params, fill=float("-inf"))
    n_heads = q.shape[1]
    grid = lambda meta: flat_grid(params.max_seqlen_q, meta["BLOCK_M"], params.batch * n_heads, "attention forward")
    _forward_tuner(params)[grid](
        q, k, v, out, lse,
        *params.mask_args(q.device), *params.cu_args(q.device),
        *seq_strides(q, params), *seq_strides(k, params), *seq_strides(v, params), *seq_strides(out, params),
        *row_stat_strides(lse, params),
        params.kpm_stride,
        n_heads, params.group, params.max_seqlen_q, params.max_seqlen_k, *params.totals(q, k), params.head_dim,
        params.qk_scale, params.cap_scale, params.window_left, params.window_right,
        params.seq_bucket, **params.flags,
    )  # fmt: skip
    return out, lse
