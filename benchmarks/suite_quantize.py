"""NF4 quantize and dequantize: fastllm vs bitsandbytes and torchao.

Bytes counted (same model for every provider, so GB/s compare like times do):
- quantize: the 16-bit input (2 * N * K) + the NF4 output in bitsandbytes' layout
  (``harness.nf4_nbytes``: N*K/2 codes + per-64 absmax codes + nested scales, ~4.127 bits/weight).
- dequantize: the NF4 input + the 16-bit output.
torchao's NF4Tensor holds about the same bytes (per-64 int8 scalers + per-256 fp32 factors).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Settings, dtype_bytes, nf4_nbytes, randn, require, require_attr, torchao_nf4

BLOCKSIZE = 64


def shapes(settings: Settings) -> list[tuple[int, int]]:
    if settings.tiny:
        return [(256, 320)]
    if settings.quick:
        return [(4096, 4096)]
    return [(4096, 4096), (14336, 4096)]


def _weight(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return randn((n, k), dtype, device, seed=n * 7 + k, scale=0.02)


def quantize_fn(provider: str, w: torch.Tensor):
    """A no-argument callable that quantizes ``w`` with ``provider`` (blocksize 64, double quant)."""
    if provider == "fastllm":
        quantize = require_attr("fastllm.nf4", "quantize")
        return lambda: quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    if provider == "bnb":
        functional = require("bitsandbytes.functional", "bitsandbytes")
        return lambda: functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    to_nf4 = torchao_nf4().to_nf4
    return lambda: to_nf4(w, BLOCKSIZE, 256)


def dequantize_fn(provider: str, w: torch.Tensor):
    """A no-argument callable returning ``w`` dequantized (in w.dtype) from ``provider``'s NF4 form."""
    if provider == "fastllm":
        nf4 = require_attr("fastllm.nf4", "quantize")(w, blocksize=BLOCKSIZE, double_quant=True)
        return lambda: nf4.dequantize(w.dtype)
    if provider == "bnb":
        functional = require("bitsandbytes.functional", "bitsandbytes")
        packed, state = functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        return lambda: functional.dequantize_4bit(packed, state)
    nf4 = torchao_nf4().to_nf4(w, BLOCKSIZE, 256)
    return nf4.get_original_weight


def cases(settings: Settings) -> list[Case]:
    out = []
    dtype = torch.bfloat16
    for n, k in shapes(settings):
        nbytes = nf4_nbytes(n * k, BLOCKSIZE) + n * k * dtype_bytes(dtype)
        for op, make in (("quantize", quantize_fn), ("dequantize", dequantize_fn)):
            for provider in ("fastllm", "bnb", "torchao"):

                def setup(make=make, provider=provider, n=n, k=k):
                    return make(provider, _weight(n, k, dtype, settings.device))

                out.append(Case("quantize", op, {"N": n, "K": k}, "bfloat16", provider, "GB/s", nbytes, setup))
    return out
