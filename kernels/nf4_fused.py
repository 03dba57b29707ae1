"""Fused NF4 dequantize-matmul kernels: y = x @ W^T (+ bias) and its backward grad_x = grad_y @ W.

W (N, K) stays packed in global memory; every kernel dequantizes (BLOCK_N, BLOCK_K) tiles in
registers (``nf4_tile.dequant_tile``) right before ``tl.dot`` and accumulates in fp32.

- Forward, M <= 16 (decode GEMV): one BLOCK_M = 16 row tile covers all of x, so every packed byte is
  read exactly once. When N tiles alone give >= 2 waves of programs (``WAVES`` x the SM count) one program
  per tile stores y in its dtype (no zeroing, no copy); otherwise the K loop is split over SPLIT_K programs
  (configs pruned to those filling 2 waves) that add fp32 partials with relaxed atomics, or, in deterministic
  mode (``torch.are_deterministic_algorithms_enabled()`` or ``FASTLLM_DETERMINISTIC=1``), store them to a
  workspace summed in a fixed order. No host synchronization: safe under CUDA graph capture once tuned.
- Forward, larger M: tiled GEMM, grouped tile order for L2 reuse, autotuned on GPU.
- Backward: tiles over the K outputs, reduces over N.

The launchers (``fused_forward``, ``fused_backward``) run on the tensors' device; ``nf4_dispatch`` decides when.

Environment: ``FASTLLM_AUTOTUNE=0`` (read at import) makes every autotuned kernel launch its first (default)
config without benchmarking the others (see ``_config``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastllm.ops.nf4 import SMALL_M

from ._config import INTERPRET, device_guard, tuning_candidates
from .nf4_tile import dequant_tile, weight_args

# Row tiles per band of the GEMM's grouped launch order.
_GROUP_M = tl.constexpr(8)


def _zero_out(nargs: dict) -> None:
    # Atomic split-K programs add into the output, so it must start at zero (also before each autotuning run).
    nargs["out_ptr"].zero_()


# Autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per kernel kind, for 16-bit dot
# operands and for fp32 ones (fp32 inputs, "ieee" or tf32 dots), which need twice the registers and shared memory
# per element and so get small tiles. The first entry is the default (all that FASTLLM_AUTOTUNE=0 keeps). Every
# entry was compiled for sm_90 and checked with ptxas: no register spills, shared memory within 227 KB.
# "small_m": the decode GEMV storing y directly (SPLIT_K = 1); "split_k": the GEMV with the K loop split.
_TILES = {
    ("small_m", False): [
        (16, 32, 128, 1, 4, 4),
        (16, 16, 256, 1, 4, 3),
        (16, 64, 128, 1, 4, 4),
        (16, 128, 64, 1, 4, 4),
    ],
    ("split_k", False): [
        (16, 32, 128, 4, 4, 4),
        (16, 32, 128, 2, 4, 4),
        (16, 64, 128, 2, 8, 4),
        (16, 32, 256, 2, 8, 3),
        (16, 64, 128, 4, 8, 3),
        (16, 32, 128, 8, 4, 4),
        (16, 64, 128, 8, 8, 3),
        (16, 32, 128, 16, 4, 4),
    ],
    ("large_m", False): [
        (128, 128, 64, 1, 8, 3),
        (128, 64, 64, 1, 4, 4),
        (64, 128, 64, 1, 4, 4),
        (64, 64, 64, 1, 4, 4),
        (128, 128, 32, 1, 4, 4),
    ],
    ("backward", False): [
        (128, 128, 64, 1, 8, 3),
        (128, 64, 64, 1, 4, 4),
        (64, 128, 64, 1, 8, 3),
        (64, 64, 64, 1, 4, 4),
        (128, 64, 128, 1, 8, 3),
    ],
    ("small_m", True): [(16, 32, 64, 1, 4, 2), (16, 16, 64, 1, 4, 2), (16, 64, 64, 1, 8, 2)],
    ("split_k", True): [(16, 32, 64, 4, 4, 2), (16, 32, 64, 2, 4, 2), (16, 64, 64, 2, 8, 2), (16, 32, 64, 8, 4, 2)],
    ("large_m", True): [(64, 64, 32, 1, 8, 2), (32, 64, 32, 1, 8, 2), (64, 32, 32, 1, 8, 2)],
    ("backward", True): [(32, 32, 64, 1, 4, 2), (64, 32, 32, 1, 4, 2), (32, 32, 32, 1, 4, 2)],
}
# The interpreter gets one small config per kernel (no tuning, fast tests).
_INTERPRETER_TILES = {
    "small_m": (16, 64, 64, 1, 4, 1),
    "split_k": (16, 64, 64, 2, 4, 1),
    "large_m": (32, 64, 64, 1, 4, 1),
    "backward": (32, 64, 64, 1, 4, 1),
}
# The largest SPLIT_K of any "split_k" config: the deterministic workspace holds this many partials.
_MAX_SPLIT = max(spec[3] for fp32 in (False, True) for spec in _TILES["split_k", fp32])
# Programs a decode launch should give each SM at least (two waves hide the tail of the first).
WAVES = 2
# The GEMV's output modes (the kernel's OUT_MODE): y stored in its dtype; fp32 partials added atomically; fp32
# partials stored to workspace[pid_k] for a deterministic sum.
_STORE, _ATOMIC, _PARTIALS = 0, 1, 2


def tile_specs(kind: str, fp32: bool) -> list[tuple[int, int, int, int, int, int]]:
    """GPU autotune candidates of ``kind`` ("small_m", "split_k", "large_m", "backward") for 16-bit or fp32 dots."""
    return _TILES[kind, fp32]


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 132 (an H100/H200) for CPU tensors under the interpreter."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(config: triton.Config, m: int, n: int, k: int) -> int:
    # Programs of a decode launch that get work: K splits beyond the number of K tiles add none.
    kw = config.kwargs
    splits = min(kw["SPLIT_K"], triton.cdiv(k, kw["BLOCK_K"]))
    return triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]) * splits


def _fill_waves(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # Autotuner pruning of the decode kinds: keep the configs whose grid has WAVES programs per SM (all the
    # largest-grid configs when none does), so the tuner only times launches that fill the GPU.
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    want = WAVES * num_sms(named_args["x_ptr"].device)
    programs = {c: _programs(c, m, n, k) for c in configs}
    full = [c for c in configs if programs[c] >= want]
    return full or [c for c in configs if programs[c] == max(programs.values())]


@functools.cache
def _tuner(kind: str, fp32: bool, out_mode: int = _STORE) -> triton.runtime.Autotuner:
    """The autotuned kernel of ``kind`` for 16-bit or fp32 dot operands (and a GEMV output mode), built on first
    use."""
    specs = tuning_candidates(tile_specs(kind, fp32), _INTERPRETER_TILES[kind])
    configs = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
            num_warps=warps,
            num_stages=stages,
            pre_hook=_zero_out if out_mode == _ATOMIC else None,
        )
        for bm, bn, bk, sk, warps, stages in specs
    ]
    kernel = _backward_kernel if kind == "backward" else _forward_kernel
    prune = {"early_config_prune": _fill_waves} if kind in ("small_m", "split_k") else None
    return triton.autotune(configs, key=["M_BUCKET", "N", "K"], prune_configs_by=prune)(kernel)


@triton.jit
def _forward_kernel(
    x_ptr,
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    pairs_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    OUT_MODE: tl.constexpr,
):
    # Grouped tile order: consecutive programs walk _GROUP_M row tiles down one band of N tiles,
    # so the packed W tiles they share are still in L2 (a no-op when M fits one tile).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (_GROUP_M * tiles_n)
    first_m = group * _GROUP_M
    group_rows = min(tiles_m - first_m, _GROUP_M)
    pid_m = first_m + (pid % (_GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (_GROUP_M * tiles_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * K

    # acc[m, n] = sum_k x[m, k] * W[n, k] over this program's K tiles (pid_k, pid_k + SPLIT_K, ...):
    # tiles start at multiples of BLOCK_K, so each stays aligned with the quantization blocks.
    dot_ty = tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = dequant_tile(
            data_ptr,
            absmax_ptr,
            nested_ptr,
            offset_ptr,
            dmap_ptr,
            pairs_ptr,
            offs_n,
            kt * BLOCK_K,
            N,
            K,
            BLOCK_N,
            BLOCK_K,
            BLOCKSIZE,
            DOUBLE_QUANT,
        )
        acc = tl.dot(x.to(dot_ty), tl.trans(w.to(dot_ty)), acc, input_precision=DOT_PRECISION)

    # Epilogue: the bias is added once (by the first K split). OUT_MODE _STORE: y in its dtype (SPLIT_K = 1);
    # _ATOMIC: fp32 partials added into a zeroed fp32 buffer (relaxed: only the final sum is read, after the
    # kernel); _PARTIALS: fp32 partial pid_k stored at workspace[pid_k] (M, N), summed later in a fixed order.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if OUT_MODE == 0:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif OUT_MODE == 1:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out + pid_k.to(tl.int64) * M * N, acc, mask=mask)


@triton.jit
def _backward_kernel(
    grad_ptr,
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    pairs_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # One program owns a (BLOCK_M, BLOCK_K) tile of grad_x; the K tile index varies fastest so
    # programs running together share the same grad_y rows.
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // tiles_k
    pid_k = pid % tiles_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    g_rows = grad_ptr + offs_m[:, None].to(tl.int64) * N

    # acc[m, k] = sum_n grad_y[m, n] * W[n, k]: walk N in BLOCK_N steps, dequantizing the
    # (BLOCK_N, BLOCK_K) slab of W that this K tile needs.
    dot_ty = tl.float32 if DOT_FP32 else grad_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_rows + offs_n[None, :], mask=m_mask[:, None] & (offs_n < N)[None, :], other=0.0)
        w = dequant_tile(
            data_ptr,
            absmax_ptr,
            nested_ptr,
            offset_ptr,
            dmap_ptr,
            pairs_ptr,
            offs_n,
            pid_k * BLOCK_K,
            N,
            K,
            BLOCK_N,
            BLOCK_K,
            BLOCKSIZE,
            DOUBLE_QUANT,
        )
        acc = tl.dot(g.to(dot_ty), w.to(dot_ty), acc, input_precision=DOT_PRECISION)

    out = out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_k < K)[None, :])


def _m_bucket(m: int) -> int:
    # Autotuning key for the row count: powers of two up to 4096, so varying M rarely retunes.
    return min(triton.next_power_of_2(m), 4096)


def _dot_mode(dtype: torch.dtype) -> tuple[bool, str | None]:
    # (operands in fp32?, tl.dot input_precision). fp32 inputs follow torch's TF32 switch (None: the
    # default, tensor cores for fp16/bf16). The interpreter's tl.dot mishandles bf16, so there bf16
    # operands are upcast to fp32.
    if dtype == torch.float32:
        tf32 = not INTERPRET and torch.backends.cuda.matmul.allow_tf32
        return True, "tf32" if tf32 else "ieee"
    return INTERPRET and dtype == torch.bfloat16, None


def fused_forward(x2d: torch.Tensor, tensors: tuple, bias: torch.Tensor | None, blocksize: int, n: int) -> torch.Tensor:
    """x2d (M, K) @ W^T + bias -> (M, N) in x2d.dtype; W given by its tensors (``NF4Weight.tensors()`` order).
    M <= SMALL_M takes the decode GEMV (direct store or split-K, see the module docstring), larger M the tiled
    GEMM."""
    with device_guard(x2d):
        return _forward(x2d, tensors, bias, blocksize, n)


def fused_backward(g2d: torch.Tensor, tensors: tuple, blocksize: int, k: int) -> torch.Tensor:
    """grad_y (M, N) @ W -> (M, K) in g2d.dtype."""
    with device_guard(g2d):
        return _backward(g2d, tensors, blocksize, k)


def deterministic() -> bool:
    """Whether the decode GEMV must avoid atomics: ``torch.use_deterministic_algorithms(True)`` or
    ``FASTLLM_DETERMINISTIC=1`` (read at each call)."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTLLM_DETERMINISTIC") == "1"


def _forward(x2d, weight, bias, blocksize: int, n: int) -> torch.Tensor:
    m, k = x2d.shape
    tensors, double_quant = weight_args(*weight)
    dot_fp32, precision = _dot_mode(x2d.dtype)
    if m > SMALL_M:
        kind, mode = "large_m", _STORE
    elif triton.cdiv(n, 32) >= WAVES * num_sms(x2d.device):
        # Enough N tiles of 32 rows for two waves: one program per tile, y stored directly.
        kind, mode = "small_m", _STORE
    else:
        kind, mode = "split_k", _PARTIALS if deterministic() else _ATOMIC
    if mode == _STORE:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    elif mode == _ATOMIC:  # zeroed by the config's pre-hook
        out = torch.empty((m, n), dtype=torch.float32, device=x2d.device)
    else:  # partials of unused split slots stay zero, so the sum over every slot is exact
        out = torch.zeros((_MAX_SPLIT, m, n), dtype=torch.float32, device=x2d.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    # enable_fp_fusion=False: the double-quant scale decode rounds twice, as on the CPU (see nf4_tile).
    _tuner(kind, dot_fp32, mode)[grid](
        x2d, *tensors, bias if bias is not None else x2d, out, m, n, k, _m_bucket(m),
        HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision, OUT_MODE=mode, enable_fp_fusion=False,
    )  # fmt: skip
    if mode == _PARTIALS:
        out = out.sum(0)
    return out.to(x2d.dtype)


def _backward(g2d, weight, blocksize: int, k: int) -> torch.Tensor:
    m, n = g2d.shape
    tensors, double_quant = weight_args(*weight)
    dot_fp32, precision = _dot_mode(g2d.dtype)
    out = torch.empty((m, k), dtype=g2d.dtype, device=g2d.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    _tuner("backward", dot_fp32)[grid](
        g2d, *tensors, out, m, n, k, _m_bucket(m),
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
