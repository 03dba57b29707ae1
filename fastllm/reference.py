"""Plain PyTorch ground truth for every fastllm op.

Nothing here imports a kernel or the C++ extension. Tests compare kernels against these
functions (computed in fp32/fp64); the package falls back to them where no faster backend
exists. The quantizers reproduce bitsandbytes (>= 0.46, CPU backend) byte for byte.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastllm.codebook import NESTED_BLOCKSIZE, NF4_ZERO_INDEX, dynamic_map, nf4_code

# bitsandbytes' CPU 8-bit quantizer maps a normalised value in [-1, 1] onto a uniform
# grid of this many points and looks the code up in a table built once per code map.
_LUT_SIZE = 65536


class NF4Parts(NamedTuple):
    """The tensors of one NF4-quantized weight (see ``fastllm.nf4.NF4Weight``)."""

    packed: torch.Tensor  # uint8 [(numel + 1) // 2], first element in the high nibble
    absmax: torch.Tensor  # fp32 [nblocks], or uint8 [nblocks] codes when double-quantized
    nested_absmax: torch.Tensor | None  # fp32 [ceil(nblocks / 256)] when double-quantized
    offset: torch.Tensor | None  # fp32 scalar: the mean subtracted before double quantization


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| over consecutive blocks of ``blocksize`` of a 1-D fp32 tensor (last block may be short)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))
    return padded.view(nblocks, blocksize).abs().amax(dim=1)


def quantize_nf4_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 codes of a 1-D fp32 tensor.

    Returns (codes uint8 [n] in 0..15, absmax fp32 [nblocks]). Full blocks are scaled by the
    fp32 reciprocal of their absmax, a short tail block is divided by its absmax (as
    bitsandbytes does); each value goes to the nearest code, a value exactly on a midpoint
    to the lower code. An all-zero block has absmax 0 and codes 7 (the value 0.0).
    """
    n = flat.numel()
    full = n - n % blocksize
    absmax = blockwise_absmax(flat, blocksize)
    safe = absmax.clamp(min=1e-38)
    head = flat[:full].view(-1, blocksize) * (1.0 / safe[: full // blocksize]).view(-1, 1)
    parts = [head.reshape(-1)]
    if full < n:
        parts.append(flat[full:] / safe[-1])
    scaled = torch.cat(parts).clamp(-1, 1)
    code = nf4_code(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes [n] (0..15) two per byte, the first in the high nibble: uint8 [(n + 1) // 2].

    An odd count is padded with the code of 0.0 (7), as bitsandbytes pads with a zero value.
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_INDEX)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [(n + 1) // 2] -> uint8 codes [n]."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    # Point i of the uniform grid is -1 + 2i / 65535 (fp32); its entry is the index of the
    # nearest code, i.e. the number of code midpoints strictly below the point.
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0 / (_LUT_SIZE - 1) - 1.0
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints.cpu(), grid, side="left").to(torch.uint8)


def quantize_blockwise_8bit(flat: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantizer with the dynamic map.

    flat: 1-D fp32. Returns (codes uint8 [n], absmax fp32 [nblocks]). Each value is scaled
    by the fp32 reciprocal of its block absmax, rounded onto a 65536-point grid over
    [-1, 1] and looked up (see ``_lookup_table``); an all-zero block gets codes 0.
    """
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = flat * inv.repeat_interleave(blocksize)[:n]
    grid_index = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _lookup_table(dynamic_map()).to(flat.device)[grid_index]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    codes = torch.where(zero_block, torch.zeros_like(codes), codes)
    return codes, absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """code[q] * absmax[block] in fp32: uint8 [n] -> fp32 [n]."""
    n = codes.numel()
    return dynamic_map(codes.device)[codes.long()] * absmax.repeat_interleave(blocksize)[:n]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Parts:
    """Quantize a floating tensor of any shape (flattened row-major) to NF4.

    Matches ``bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` byte for byte. No input validation: see
    ``fastllm.nf4.quantize`` for the checked front door.
    """
    flat = weight.reshape(-1).float()
    codes, absmax = quantize_nf4_codes(flat, blocksize)
    packed = pack_nibbles(codes)
    if not double_quant:
        return NF4Parts(packed, absmax, None, None)
    offset = absmax.mean()
    absmax_codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Parts(packed, absmax_codes, nested_absmax, offset)


def block_scales(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor:
    """The fp32 per-block scale: absmax itself, or dynamic[q] * nested_absmax[q_block] + offset."""
    if nested_absmax is None:
        return absmax.float()
    return dequantize_blockwise_8bit(absmax, nested_absmax, NESTED_BLOCKSIZE) + offset


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NF4 -> dense: code[q] * scale[block] computed in fp32, then cast to ``dtype``; shape ``shape``."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed.reshape(-1), n)
    scales = block_scales(absmax, nested_absmax, offset)
    values = nf4_code(packed.device)[codes.long()] * scales.repeat_interleave(blocksize)[:n]
    return values.to(dtype).reshape(shape)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T + bias in fp64 (the ground truth for the NF4 matmul kernels).

    x (..., K), weight (N, K), bias (N,) -> y (..., N) float64.
    """
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def attention_visibility(
    sq: int,
    sk: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may see: bool (B or 1, 1, Sq, Sk), True = visible.

    With diag = Sk - Sq (bottom-right alignment, as flash-attn): ``causal`` -> j <= i + diag;
    ``window=(left, right)`` -> i + diag - left <= j <= i + diag + right (None or -1 = unbounded side);
    ``key_padding_mask`` bool (B, Sk) -> mask[b, j].
    """
    rel = torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None] - (sk - sq)
    allowed = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=device)
    left, right = window if window is not None else (None, None)
    if causal:
        allowed = allowed & (rel <= 0)
    if left is not None and left >= 0:
        allowed = allowed & (rel >= -left)
    if right is not None and right >= 0:
        allowed = allowed & (rel <= right)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention computed in ``dtype`` (fp64 by default): the ground truth for ``kernels.attention``.

    q (B, H, Sq, D), k and v (B, Hkv, Sk, D) with H % Hkv == 0 (query head h reads key/value head
    h // (H // Hkv)). Scores are scale * q k^T (scale defaults to D**-0.5), then softcap * tanh(s / softcap)
    when ``softcap`` is set. Query i may see key j when all of these hold (diag = Sk - Sq, bottom-right
    alignment as flash-attn): ``causal`` -> j <= i + diag; ``window=(left, right)`` -> i + diag - left <= j <=
    i + diag + right (None or -1 leaves a side unbounded); ``key_padding_mask`` bool (B, Sk) -> mask[b, j].
    A query row that sees no key gets output 0 and log-sum-exp -inf (and zero gradients).
    Returns (out (B, H, Sq, D), lse (B, H, Sq)), both in ``dtype``; differentiable.
    """
    batch, heads, sq, dim = q.shape
    group = heads // k.shape[1]
    sk = k.shape[2]
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    kd = kd.repeat_interleave(group, dim=1)
    vd = vd.repeat_interleave(group, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = attention_visibility(
        sq, sk, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device
    ).expand(batch, 1, sq, sk)
    sees_any = allowed.any(dim=-1, keepdim=True)
    # Rows that see nothing get constant scores (finite softmax, zero gradient) and are zeroed below.
    s = torch.where(sees_any, torch.where(allowed, s, float("-inf")), 0.0)
    out = torch.where(sees_any, torch.softmax(s, dim=-1) @ vd, 0.0)
    lse = torch.where(sees_any[..., 0], torch.logsumexp(s, dim=-1), float("-inf"))
    return out, lse


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    keep: float = 1.0,
) -> torch.Tensor:
    """LoRA linear in fp64: x @ W^T + b + scale * ((x * mask / keep) @ A^T) @ B^T.

    x (..., K), weight (N, K), bias (N,), lora_a (r, K), lora_b (N, r), mask bool (..., K) or None
    (the dropout keep-mask; ``keep`` = 1 - p) -> y (..., N) float64. Differentiable in every input.
    """
    xd = x.double() if mask is None else x.double() * mask.double() / keep
    return linear(x, weight, bias) + scale * (xd @ lora_a.double().T) @ lora_b.double().T
