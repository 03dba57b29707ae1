"""Triton kernel of ``fastllm::nf4_dequantize``: the dense weight W (N, K) from its NF4 tensors, at copy bandwidth.

Each program writes one (BLOCK_N, BLOCK_K) tile: it reads BLOCK_K / 2 contiguous packed bytes per row (vector
loads), looks each byte up once in the 256-entry pair table, scales by the block's absmax and writes BLOCK_K
contiguous 16-bit values per row (vector stores). Per weight that is 0.5 byte read and 2 bytes written, so the
kernel is bound by its writes; the tiles are autotuned on the GPU (key: N, K, dtype).

``dequantize_to_scratch`` writes into a buffer kept per (device, stream, dtype) and grown on demand, for the
dequantize + cuBLAS matmul path (``nf4_dispatch``): one scratch serves every layer, since each matmul that reads
it runs on the same stream before the next dequantize overwrites it.

Registered for CUDA (and for CPU under ``TRITON_INTERPRET=1``); the op is declared in ``fastllm.ops.nf4``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

import fastllm.ops.nf4  # noqa: F401  (declares the op whose kernel this module registers)

from ._config import INTERPRET, device_guard, tuning_candidates
from .nf4_tile import dequant_tile, weight_args

# Autotune candidates (BLOCK_N, BLOCK_K, num_warps, PAIR_LOOKUP): 8-32 KiB of output per program, rows of 256-1024
# columns (512 B - 2 KiB contiguous per row in 16-bit), each with both codebook lookups of ``dequant_tile`` (one
# gather per byte over 2 KiB, or two per byte within 128 B). The first is the default (FASTLLM_AUTOTUNE=0).
DENSE_TILES = [
    (16, 512, 4, True),
    (16, 512, 4, False),
    (32, 256, 4, True),
    (32, 256, 4, False),
    (8, 1024, 4, True),
    (32, 512, 8, True),
    (32, 512, 8, False),
    (64, 256, 8, True),
    (16, 1024, 8, False),
]
_INTERPRETER_TILE = (32, 64, 4, True)


@triton.jit
def _dequantize_kernel(
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    pairs_ptr,
    out_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PAIR_LOOKUP: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    # One program writes W[n tile, k tile] = NF4[code] * scale[block], computed in fp32 and rounded once to
    # the output dtype (bit-identical to the reference).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
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
        PAIR_LOOKUP,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    out = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    if BF16_BY_BITS:
        # fp32 -> bf16 rounded to nearest even on the bit pattern (add half an ulp of bf16, plus one when the kept
        # part is odd, then drop the low 16 bits): the interpreter's own cast truncates. Values are finite.
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _tuner() -> triton.runtime.Autotuner:
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PAIR_LOOKUP": pair}, num_warps=warps, num_stages=1)
        for bn, bk, warps, pair in tuning_candidates(DENSE_TILES, _INTERPRETER_TILE)
    ]
    return triton.autotune(configs, key=["N", "K", "BLOCKSIZE"])(_dequantize_kernel)


def dequantize_into(out: torch.Tensor, tensors: tuple, blocksize: int) -> torch.Tensor:
    """Write W (N, K) = ``out.shape`` in ``out.dtype`` into the contiguous ``out``, from the weight's tensors
    (``NF4Weight.tensors()`` order); bit-identical to ``fastllm.reference.dequantize_nf4``. Returns ``out``."""
    n, k = out.shape
    with device_guard(out):
        args, double_quant = weight_args(*tensors)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

        # No FMA contraction: the nested scale DYNAMIC[q] * nested + offset rounds twice, as in the reference.
        _tuner()[grid](
            *args, out, n, k, BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant,
            BF16_BY_BITS=INTERPRET and out.dtype == torch.bfloat16, enable_fp_fusion=False,
        )  # fmt: skip
    return out


# Scratch buffers of dequantize_to_scratch, keyed (device, stream id, dtype); the keys of those a captured CUDA
# graph has used, and the buffers such keys outgrew (kept alive: the graph's replays still write them).
_scratch: dict[tuple[torch.device, int, torch.dtype], torch.Tensor] = {}
_captured: set[tuple[torch.device, int, torch.dtype]] = set()
_retired: list[torch.Tensor] = []


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


def dequantize_to_scratch(tensors: tuple, blocksize: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W (n, k) in ``dtype`` in this device's and stream's scratch buffer: valid until the next call on the same
    stream (for a matmul that reads it right away). Under CUDA graph capture a buffer too small is not replaced
    (a fresh tensor from the graph's pool is used instead), and a buffer a graph has used is never freed, so
    replays never write freed memory."""
    device = tensors[0].device
    key = (device, _stream_id(device), dtype)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n * k:
        fresh = torch.empty(n * k, dtype=dtype, device=device)
        if capturing:
            return dequantize_into(fresh.view(n, k), tensors, blocksize)
        if key in _captured:
            _retired.append(buf)
        _scratch[key] = buf = fresh
    if capturing:
        _captured.add(key)
    return dequantize_into(buf[: n * k].view(n, k), tensors, blocksize)


@torch.library.register_kernel("fastllm::nf4_dequantize", ("cuda", "cpu") if INTERPRET else "cuda")
def _(data, absmax, nested_absmax, offset, blocksize, n, k, dtype):
    out = torch.empty((n, k), dtype=dtype, device=data.device)
    return dequantize_into(out, (data, absmax, nested_absmax, offset), blocksize)
