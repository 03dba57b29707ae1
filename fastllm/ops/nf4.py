"""The NF4 ops: every ``fastllm::`` op on NF4 weights, declared once (schema, fake, autograd, CPU implementation).

C++ extension ops (schemas and CPU / CUDA kernels in ``csrc/bindings.cpp``; fakes registered here):
    quantize_nf4, decode_scales, dequantize_nf4 (flat, from decoded scales), nf4_gemv.

Python ops (an NF4 weight of shape (N, K) travels as its tensors ``data, absmax, nested_absmax, offset``, see
``NF4Weight.tensors``, plus its ints; K is a multiple of ``blocksize``):
    nf4_dequantize(data, absmax, nested_absmax, offset, blocksize, n, k, dtype) -> W (N, K) in dtype
    nf4_matmul(x, data, absmax, nested_absmax, offset, bias, blocksize, n) -> x @ W^T + bias  (..., N)
    nf4_matmul_t(grad_y, data, absmax, nested_absmax, offset, blocksize, k) -> grad_y @ W  (..., K)

The bodies below are the CPU implementations (C++ extension when built, else PyTorch on the reference
dequantization); ``fastllm.kernels`` registers the Triton kernels for CUDA (and for CPU under the interpreter).
"""

from __future__ import annotations

import torch

from fastllm import _backend
from fastllm.codebook import NESTED_BLOCKSIZE
from fastllm.nf4 import NF4Weight
from fastllm.ops.cpu_matmul import bands, matmul_dtype
from fastllm.ops.gemm_choice import CPU_GEMM, m_bucket

# Decode-sized batches: M <= SMALL_M rows take a GEMV (W read once for all rows) on every device.
SMALL_M = 16


# ---- C++ extension ops: fakes (their outputs' shapes depend only on input shapes and ints) ---------------------


def _register_extension_fakes() -> None:
    @torch.library.register_fake("fastllm::quantize_nf4")
    def _(weight, blocksize, double_quant, dynamic_map):
        n = weight.numel()
        nblocks = -(-n // blocksize)
        packed = weight.new_empty(((n + 1) // 2,), dtype=torch.uint8)
        if double_quant:
            return (
                packed,
                weight.new_empty((nblocks,), dtype=torch.uint8),
                weight.new_empty((-(-nblocks // NESTED_BLOCKSIZE),), dtype=torch.float32),
                weight.new_empty((), dtype=torch.float32),
            )
        empty = weight.new_empty((0,), dtype=torch.float32)
        return packed, weight.new_empty((nblocks,), dtype=torch.float32), empty, empty.clone()

    @torch.library.register_fake("fastllm::decode_scales")
    def _(absmax, nested_absmax, offset, dynamic_map):
        return absmax.new_empty((absmax.numel(),), dtype=torch.float32)

    @torch.library.register_fake("fastllm::dequantize_nf4")
    def _(packed, scales, blocksize, numel, dtype):
        return packed.new_empty((numel,), dtype=dtype)

    @torch.library.register_fake("fastllm::nf4_gemv")
    def _(x, packed, scales, blocksize, N):
        return x.new_empty((x.shape[0], N))


if _backend.extension_loaded():
    _register_extension_fakes()


# ---- CPU implementations ------------------------------------------------------------------------------------------


def _weight(tensors: tuple, blocksize: int, n: int, k: int, dtype: torch.dtype) -> NF4Weight:
    return NF4Weight.from_tensors(tensors, blocksize, (n, k), dtype)


# The CPU large-M path dequantizes W one band at a time (about 2 MiB in the compute dtype, measured
# fastest on the 2-core EPYC of 0.1: the band stays in cache for its matmul), so the dense weight never
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


def _whole(w: NF4Weight, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The whole W (N, K) in dtype by the C++ op (its output lands on huge pages when large).
    n, k = w.shape
    return torch.ops.fastllm.dequantize_nf4(w.data, scales, w.blocksize, n * k, dtype).view(n, k)


def cpu_forward(x2d: torch.Tensor, tensors: tuple, bias: torch.Tensor | None, blocksize: int, n: int) -> torch.Tensor:
    """x2d (M, K) @ W^T + bias -> (M, N) in x2d.dtype without Triton.

    M <= SMALL_M uses the C++ ``fastllm::nf4_gemv`` op. Larger M with the extension runs the faster, measured at
    first use (``gemm_choice.CPU_GEMM``), of: "fused", y[:, band] = x @ W[band]^T over bands of rows of W, each
    dequantized just before its matmul; "dequant", the whole W dequantized then one matmul. Both multiply in
    ``cpu_matmul.matmul_dtype`` (fp32 for 16-bit x on CPUs without native 16-bit matmuls). Without the
    extension: dequantize + matmul.
    """
    m, k = x2d.shape
    w = _weight(tensors, blocksize, n, k, x2d.dtype)
    if not _backend.has_op("nf4_gemv", x2d.device):
        return torch.nn.functional.linear(x2d, w.dequantize(x2d.dtype), bias)
    scales = w.block_scales()
    if m <= SMALL_M:
        y = torch.ops.fastllm.nf4_gemv(x2d, w.data, scales, blocksize, n).to(x2d.dtype)
        return y if bias is None else y + bias

    compute = matmul_dtype(x2d.dtype)  # fp32 for 16-bit x where this CPU lacks native 16-bit matmuls
    xc = x2d.to(compute)

    def banded():
        y = x2d.new_empty((m, n))
        for rows in bands(n, k, compute, _CPU_BAND_BYTES):
            y[:, rows] = xc @ _dense_band(w, scales, rows, slice(0, k), compute).T
        return y

    paths = {"fused": banded, "dequant": lambda: (xc @ _whole(w, scales, compute).T).to(x2d.dtype)}
    y = CPU_GEMM.run(("fwd", m_bucket(m), n, k, x2d.dtype, x2d.device), paths, x2d.device)
    return y if bias is None else y + bias


def cpu_backward(g2d: torch.Tensor, tensors: tuple, blocksize: int, k: int) -> torch.Tensor:
    """grad_y (M, N) @ W -> (M, K) in g2d.dtype without Triton.

    With the extension, the faster (measured at first use, as in :func:`cpu_forward`) of: "fused",
    grad_x[:, band] = grad_y @ W[:, band] over bands of whole quantization blocks of columns of W; "dequant", the
    whole W dequantized then one matmul. Without it: dequantize + matmul.
    """
    m, n = g2d.shape
    w = _weight(tensors, blocksize, n, k, g2d.dtype)
    if not _backend.has_op("dequantize_nf4", g2d.device):
        return g2d @ w.dequantize()
    scales = w.block_scales()

    compute = matmul_dtype(g2d.dtype)
    gc = g2d.to(compute)

    def banded():
        grad_x = g2d.new_empty((m, k))
        for cols in bands(k, n, compute, _CPU_BAND_BYTES, multiple=blocksize):
            grad_x[:, cols] = gc @ _dense_band(w, scales, slice(0, n), cols, compute)
        return grad_x

    paths = {"fused": banded, "dequant": lambda: (gc @ _whole(w, scales, compute)).to(g2d.dtype)}
    return CPU_GEMM.run(("bwd", m_bucket(m), n, k, g2d.dtype, g2d.device), paths, g2d.device)


# ---- nf4_dequantize ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastllm::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    data: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    n: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W (n, k) in ``dtype``: NF4 code * block scale in fp32, then rounded once (bit-identical on every device)."""
    return _weight((data, absmax, nested_absmax, offset), blocksize, n, k, dtype).dequantize(dtype)


@nf4_dequantize.register_fake
def _(data, absmax, nested_absmax, offset, blocksize, n, k, dtype):
    return data.new_empty((n, k), dtype=dtype)


# ---- nf4_matmul / nf4_matmul_t --------------------------------------------------------------------------------------


@torch.library.custom_op("fastllm::nf4_matmul", mutates_args=())
def nf4_matmul(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    blocksize: int,
    n: int,
) -> torch.Tensor:
    """x (..., K) @ W^T + bias -> (..., N) in x.dtype, accumulated in fp32."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = cpu_forward(x2d, (data, absmax, nested_absmax, offset), bias, blocksize, n)
    return y.reshape(*x.shape[:-1], n)


@nf4_matmul.register_fake
def _(x, data, absmax, nested_absmax, offset, bias, blocksize, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("fastllm::nf4_matmul_t", mutates_args=())
def nf4_matmul_t(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    k: int,
) -> torch.Tensor:
    """grad_y (..., N) @ W -> (..., K) in grad_y.dtype, accumulated in fp32."""
    g2d = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
    return cpu_backward(g2d, (data, absmax, nested_absmax, offset), blocksize, k).reshape(*grad_y.shape[:-1], k)


@nf4_matmul_t.register_fake
def _(grad_y, data, absmax, nested_absmax, offset, blocksize, k):
    return grad_y.new_empty((*grad_y.shape[:-1], k))


def _setup_context(ctx, inputs, output) -> None:
    # Only the packed weight is kept for backward (never a dense copy).
    x, data, absmax, nested_absmax, offset, _bias, blocksize, n = inputs
    ctx.save_for_backward(data, absmax, nested_absmax, offset)
    ctx.blocksize, ctx.n, ctx.k = blocksize, n, x.shape[-1]


def _matmul_backward(ctx, grad_y):
    # y = x W^T + b: grad_x = grad_y W, grad_b = grad_y summed over every leading dim; W is frozen.
    tensors = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = nf4_matmul_t(grad_y, *tensors, ctx.blocksize, ctx.k)
    if ctx.needs_input_grad[5]:
        grad_b = grad_y.reshape(-1, ctx.n).sum(0, dtype=torch.float32).to(grad_y.dtype)
    return grad_x, None, None, None, None, grad_b, None, None


def _setup_context_t(ctx, inputs, output) -> None:
    grad_y, data, absmax, nested_absmax, offset, blocksize, _k = inputs
    ctx.save_for_backward(data, absmax, nested_absmax, offset)
    ctx.blocksize, ctx.n = blocksize, grad_y.shape[-1]


def _matmul_t_backward(ctx, grad_out):
    # z = g W is linear in g: grad_g = grad_z W^T (double backward of nf4_matmul).
    grad_g = nf4_matmul(grad_out, *ctx.saved_tensors, None, ctx.blocksize, ctx.n)
    return grad_g, None, None, None, None, None, None


nf4_matmul.register_autograd(_matmul_backward, setup_context=_setup_context)
nf4_matmul_t.register_autograd(_matmul_t_backward, setup_context=_setup_context_t)
