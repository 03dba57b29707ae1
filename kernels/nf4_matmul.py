"""Fused NF4 dequantize-matmul: y = x @ W^T (+ bias) and its backward grad_x = grad_y @ W.

W (N, K) stays packed in global memory; every kernel dequantizes (BLOCK_N, BLOCK_K) tiles in
registers (``nf4_dequant.dequant_tile``) right before ``tl.dot`` and accumulates in fp32.

- Forward, M <= 16 (decode): one BLOCK_M = 16 row tile covers all of x, so every packed byte is
  read exactly once; the K loop is split over SPLIT_K programs that add fp32 partials atomically.
- Forward, larger M: tiled GEMM, grouped tile order for L2 reuse, autotuned on GPU.
- Backward: tiles over the K outputs, reduces over N.

Dispatch: CUDA -> Triton; CPU under ``TRITON_INTERPRET=1`` -> the same Triton kernels; other CPU
-> the C++ ``fastllm::nf4_gemv`` op for M <= 16 when built, else dequantize + torch matmul.

Environment: ``FASTLLM_AUTOTUNE=0`` (read at import) makes every autotuned kernel launch its first (default)
config without benchmarking the others (see ``_config``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastllm import _backend
from fastllm.nf4 import FLOAT_DTYPES, NF4Weight

from ._config import INTERPRET, tuning_candidates, uses_triton
from .nf4_dequant import check_weight, dequant_tile, weight_args

# Decode-sized batches (M rows) take the split-K kernel; larger ones the tiled GEMM.
SMALL_M = 16
# Row tiles per band of the GEMM's grouped launch order.
_GROUP_M = tl.constexpr(8)


def _zero_out(nargs: dict) -> None:
    # Split-K programs add into the output, so it must start at zero (also before each autotuning run).
    nargs["out_ptr"].zero_()


# Autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per kernel kind, for 16-bit dot
# operands and for fp32 ones (fp32 inputs, "ieee" or tf32 dots), which need twice the registers and shared memory
# per element and so get small tiles. The first entry is the default (all that FASTLLM_AUTOTUNE=0 keeps). Every
# entry was compiled for sm_90 and checked with ptxas: no register spills, shared memory within 227 KB.
_TILES = {
    ("small_m", False): [
        (16, 32, 128, 1, 4, 4),
        (16, 128, 64, 1, 4, 4),
        (16, 64, 128, 2, 8, 4),
        (16, 32, 256, 2, 8, 3),
        (16, 64, 128, 4, 8, 3),
        (16, 64, 128, 8, 8, 3),
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
        (64, 128, 64, 1, 4, 4),
        (64, 64, 64, 1, 4, 4),
        (128, 64, 128, 1, 8, 3),
    ],
    ("small_m", True): [(16, 32, 64, 1, 4, 2), (16, 32, 64, 2, 4, 2), (16, 64, 64, 2, 8, 2)],
    ("large_m", True): [(64, 64, 32, 1, 8, 2), (32, 64, 32, 1, 4, 2), (64, 32, 32, 1, 4, 2)],
    ("backward", True): [(32, 32, 64, 1, 4, 2), (64, 32, 32, 1, 4, 2), (32, 32, 32, 1, 4, 2)],
}
# The interpreter gets one small config per kernel (no tuning, fast tests); SPLIT_K = 2 keeps the
# atomic split-K path under test.
_INTERPRETER_TILES = {
    "small_m": (16, 64, 64, 2, 4, 1),
    "large_m": (32, 64, 64, 1, 4, 1),
    "backward": (32, 64, 64, 1, 4, 1),
}


def tile_specs(kind: str, fp32: bool) -> list[tuple[int, int, int, int, int, int]]:
    """GPU autotune candidates of ``kind`` ("small_m", "large_m", "backward") for 16-bit or fp32 dot operands."""
    return _TILES[kind, fp32]


@functools.cache
def _tuner(kind: str, fp32: bool) -> triton.runtime.Autotuner:
    """The autotuned kernel of ``kind`` for 16-bit or fp32 dot operands, built on first use."""
    specs = tuning_candidates(tile_specs(kind, fp32), _INTERPRETER_TILES[kind])
    split = kind == "small_m"
    configs = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
            num_warps=warps,
            num_stages=stages,
            pre_hook=_zero_out if split else None,
        )
        for bm, bn, bk, sk, warps, stages in specs
    ]
    kernel = _backward_kernel if kind == "backward" else _forward_kernel
    return triton.autotune(configs, key=["M_BUCKET", "N", "K"])(kernel)


@triton.jit
def _forward_kernel(
    x_ptr,
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    code_ptr,
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
            code_ptr,
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

    # Epilogue: the bias is added once (by the first K split); a single split stores y in its dtype,
    # several splits add their fp32 partials into a zeroed fp32 buffer.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _backward_kernel(
    grad_ptr,
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    code_ptr,
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
            code_ptr,
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


def _triton_forward(x2d, data, absmax, nested_absmax, offset, bias, blocksize: int, n: int) -> torch.Tensor:
    m, k = x2d.shape
    tensors, double_quant = weight_args(data, absmax, nested_absmax, offset)
    dot_fp32, precision = _dot_mode(x2d.dtype)
    small = m <= SMALL_M
    # Split-K adds partials into an fp32 buffer (zeroed by the config's pre-hook).
    out = torch.empty((m, n), dtype=torch.float32 if small else x2d.dtype, device=x2d.device)
    kernel = _tuner("small_m" if small else "large_m", dot_fp32)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](
        x2d, *tensors, bias if bias is not None else x2d, out, m, n, k, _m_bucket(m),
        HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )  # fmt: skip
    return out.to(x2d.dtype)


def _triton_backward(g2d, data, absmax, nested_absmax, offset, blocksize: int, k: int) -> torch.Tensor:
    m, n = g2d.shape
    tensors, double_quant = weight_args(data, absmax, nested_absmax, offset)
    dot_fp32, precision = _dot_mode(g2d.dtype)
    out = torch.empty((m, k), dtype=g2d.dtype, device=g2d.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    _tuner("backward", dot_fp32)[grid](
        g2d, *tensors, out, m, n, k, _m_bucket(m),
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )  # fmt: skip
    return out


def _weight(data, absmax, nested_absmax, offset, blocksize: int, n: int, k: int, dtype: torch.dtype) -> NF4Weight:
    # Reassemble the NF4Weight the op was decomposed from (its methods use the C++ extension when built).
    return NF4Weight(data, absmax, blocksize, torch.Size((n, k)), dtype, nested_absmax, offset)


# The CPU large-M path dequantizes W one band at a time (about 2 MiB in the compute dtype, measured
# fastest on this 2-core EPYC: the band stays in cache for its matmul), so the dense weight never
# exists whole and every output element still comes from a single matmul over the full reduction.
_CPU_BAND_BYTES = 2 << 20


def _dense_band(w: NF4Weight, scales: torch.Tensor, rows: slice, cols: slice, dtype: torch.dtype) -> torch.Tensor:
    # W[rows, cols] in dtype by the C++ op; cols are whole quantization blocks (K and the band width
    # are multiples of the blocksize), so the band's packed bytes and scales are plain 2-D slices.
    n, k = w.shape
    packed = w.data.reshape(n, k // 2)[rows, cols.start // 2 : cols.stop // 2]
    bs = w.blocksize
    band_scales = scales.reshape(n, k // bs)[rows, cols.start // bs : cols.stop // bs]
    numel = packed.numel() * 2
    dense = torch.ops.fastllm.dequantize_nf4(packed.contiguous(), band_scales.contiguous(), bs, numel, dtype)
    return dense.view(packed.shape[0], packed.shape[1] * 2)


def _bands(total: int, other: int, multiple: int, dtype: torch.dtype):
    # Slices of range(total), each about _CPU_BAND_BYTES / (other * itemsize) long, rounded down to
    # a multiple of `multiple` (at least one multiple).
    step = _CPU_BAND_BYTES // (other * torch.finfo(dtype).bits // 8)
    step = max(multiple, step - step % multiple)
    return [slice(i, min(total, i + step)) for i in range(0, total, step)]


def cpu_forward(x2d, data, absmax, nested_absmax, offset, bias, blocksize: int, n: int) -> torch.Tensor:
    """The CPU path without Triton: x2d (M, K) -> (M, N) in x2d.dtype.

    M <= 16 uses the C++ ``fastllm::nf4_gemv`` op. Larger M with the extension: y[:, band] = x @ W[band]^T
    over bands of rows of W, each dequantized just before its matmul; without it, dequantize + matmul.
    """
    m, k = x2d.shape
    w = _weight(data, absmax, nested_absmax, offset, blocksize, n, k, x2d.dtype)
    if not _backend.has_op("nf4_gemv", "cpu"):
        return torch.nn.functional.linear(x2d, w.dequantize(x2d.dtype), bias)
    scales = w.block_scales()
    if m <= SMALL_M:
        y = torch.ops.fastllm.nf4_gemv(x2d, data, scales, blocksize, n).to(x2d.dtype)
    else:
        y = x2d.new_empty((m, n))
        for rows in _bands(n, k, 1, x2d.dtype):
            y[:, rows] = x2d @ _dense_band(w, scales, rows, slice(0, k), x2d.dtype).T
    return y if bias is None else y + bias


def cpu_backward(g2d, data, absmax, nested_absmax, offset, blocksize: int, k: int) -> torch.Tensor:
    """The CPU path without Triton: grad_y (M, N) -> grad_y @ W (M, K).

    With the extension: grad_x[:, band] = grad_y @ W[:, band] over bands of whole quantization blocks
    of columns of W; without it, dequantize + matmul.
    """
    m, n = g2d.shape
    w = _weight(data, absmax, nested_absmax, offset, blocksize, n, k, g2d.dtype)
    if not _backend.has_op("dequantize_nf4", "cpu"):
        return g2d @ w.dequantize()
    scales = w.block_scales()
    grad_x = g2d.new_empty((m, k))
    for cols in _bands(k, n, blocksize, g2d.dtype):
        grad_x[:, cols] = g2d @ _dense_band(w, scales, slice(0, n), cols, g2d.dtype)
    return grad_x


# ---- torch.library ops: NF4Weight is decomposed into its tensors and ints --------------------------


@torch.library.custom_op("fastllm::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    blocksize: int,
    n: int,
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    impl = _triton_forward if uses_triton(x.device) else cpu_forward
    y = impl(x2d, data, absmax, nested_absmax, offset, bias, blocksize, n)
    return y.reshape(*x.shape[:-1], n)


@_nf4_matmul_op.register_fake
def _(x, data, absmax, nested_absmax, offset, bias, blocksize, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("fastllm::nf4_matmul_t", mutates_args=())
def _nf4_matmul_t_op(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    k: int,
) -> torch.Tensor:
    g2d = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
    impl = _triton_backward if uses_triton(grad_y.device) else cpu_backward
    return impl(g2d, data, absmax, nested_absmax, offset, blocksize, k).reshape(*grad_y.shape[:-1], k)


@_nf4_matmul_t_op.register_fake
def _(grad_y, data, absmax, nested_absmax, offset, blocksize, k):
    return grad_y.new_empty((*grad_y.shape[:-1], k))


def _setup_context(ctx, inputs, output) -> None:
    # Only the packed weight is kept for backward (never a dense copy).
    x, data, absmax, nested_absmax, offset, _bias, blocksize, n = inputs
    ctx.save_for_backward(data, absmax, nested_absmax, offset)
    ctx.blocksize, ctx.n, ctx.k = blocksize, n, x.shape[-1]


def _matmul_backward(ctx, grad_y):
    # y = x W^T + b: grad_x = grad_y W, grad_b = grad_y summed over every leading dim; W is frozen.
    data, absmax, nested_absmax, offset = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _nf4_matmul_t_op(grad_y, data, absmax, nested_absmax, offset, ctx.blocksize, ctx.k)
    if ctx.needs_input_grad[5]:
        grad_b = grad_y.reshape(-1, ctx.n).sum(0, dtype=torch.float32).to(grad_y.dtype)
    return grad_x, None, None, None, None, grad_b, None, None


def _setup_context_t(ctx, inputs, output) -> None:
    _grad_y, data, absmax, nested_absmax, offset, blocksize, k = inputs
    ctx.save_for_backward(data, absmax, nested_absmax, offset)
    ctx.blocksize, ctx.n = blocksize, inputs[0].shape[-1]


def _matmul_t_backward(ctx, grad_out):
    # z = g W is linear in g: grad_g = grad_z W^T (double backward of nf4_matmul).
    data, absmax, nested_absmax, offset = ctx.saved_tensors
    grad_g = _nf4_matmul_op(grad_out, data, absmax, nested_absmax, offset, None, ctx.blocksize, ctx.n)
    return grad_g, None, None, None, None, None, None


_nf4_matmul_op.register_autograd(_matmul_backward, setup_context=_setup_context)
_nf4_matmul_t_op.register_autograd(_matmul_t_backward, setup_context=_setup_context_t)


# ---- public API -------------------------------------------------------------------------------------


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
    """y = x @ W^T + bias with W dequantized on the fly (never materialized on the Triton paths).

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
    return _nf4_matmul_op(x, w.data, w.absmax, w.nested_absmax, w.offset, bias, w.blocksize, n)


def nf4_matmul_t(grad_y: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad_y @ W, the input gradient of :func:`nf4_matmul` (W dequantized on the fly).

    Args:
        grad_y: (..., N) float16 / bfloat16 / float32.
        w: NF4 weight of shape (N, K); K a multiple of ``w.blocksize``.
    Returns:
        (..., K) in grad_y.dtype, accumulated in fp32.
    """
    n, k = check_weight(w)
    _check_activation("grad_y", grad_y, n, "out_features N", w)
    return _nf4_matmul_t_op(grad_y, w.data, w.absmax, w.nested_absmax, w.offset, w.blocksize, k)
