"""NF4 dequantization of one tile in registers (``dequant_tile``), shared by every NF4 kernel, and the weight's
kernel arguments.

Format (see ``fastllm.nf4``): W (N, K) row-major, flattened, in blocks of ``blocksize`` elements;
element (n, k) is nibble ``k % 2`` of byte ``n * K/2 + k // 2`` (even k in the high nibble) and
belongs to block ``(n * K + k) // blocksize = n * (K / blocksize) + k // blocksize`` (K is a
multiple of blocksize, so a block never straddles two rows). Its value is
``NF4[code] * scale[block]`` with ``scale = absmax`` (fp32), or with double quantization
``scale = DYNAMIC[absmax_code] * nested_absmax[block // 256] + offset``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastllm.codebook import NESTED_BLOCKSIZE, dynamic_map, nf4_code

# Double quantization groups this many absmax codes under one nested fp32 scale.
_NESTED = tl.constexpr(NESTED_BLOCKSIZE)


@functools.cache
def code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte-pair table fp32 (512,), dynamic 8-bit map fp32 (256,)) on ``device``, built once per device.

    The pair table maps a packed byte b to both of its values: entries 2b, 2b + 1 are NF4[b >> 4], NF4[b & 15]
    (the element with the even k first), so a kernel looks each byte up once instead of each nibble.
    """
    code = nf4_code(device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack((code[byte >> 4], code[byte & 15]), dim=1).reshape(-1).contiguous()
    return pairs, dynamic_map(device)


def weight_args(
    data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None, offset: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, ...], bool]:
    """((data, absmax, nested, offset, dynamic map, byte-pair table), double_quant): the weight's kernel arguments
    in ``dequant_tile``'s order, unit-stride (the kernels index them flat).

    Without double quantization the nested/offset pointers are never read; ``absmax`` stands in.
    """
    pairs, dmap = code_tables(absmax.device)
    data, absmax = data.contiguous(), absmax.contiguous()
    if nested_absmax is None:
        return (data, absmax, absmax, absmax, dmap, pairs), False
    return (data, absmax, nested_absmax.contiguous(), offset, dmap, pairs), True


@triton.jit
def _block_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr):
    # Scale of each block index in ``blk`` (any shape), fp32. With double quantization the stored
    # absmax is an 8-bit code q: scale = DYNAMIC[q] * nested_absmax[blk // _NESTED] + offset.
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + blk // _NESTED, mask=mask, other=0.0)
        # Two roundings (a product, then a sum), as the reference and the C++ kernels: launches of kernels that
        # use this pass enable_fp_fusion=False, so the compiler does not contract them into one FMA.
        return tl.load(dmap_ptr + q) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def dequant_tile(
    data_ptr,
    absmax_ptr,
    nested_ptr,
    offset_ptr,
    dmap_ptr,
    pairs_ptr,
    offs_n,
    k0,
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIR_LOOKUP: tl.constexpr = True,
):
    """fp32 tile W[offs_n, k0 : k0 + BLOCK_K] of shape (BLOCK_N, BLOCK_K); zero outside W.

    ``k0`` must be a multiple of BLOCK_K (so the tile is aligned with the quantization blocks). PAIR_LOOKUP: one
    8-byte lookup per packed byte in the whole pair table, else two 4-byte lookups per byte in its first 128 bytes
    (fewer L1 wavefronts per gather; which is faster is measured by the dense kernel's autotuner).
    """
    n_mask = offs_n < N
    # Packed bytes: row n holds K/2 bytes; the tile covers bytes k0/2 .. k0/2 + BLOCK_K/2 of each row.
    # Each byte is read once; out-of-range bytes read as 0x77 (two codes of the value 0.0).
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte_mask = n_mask[:, None] & (offs_b < K // 2)[None, :]
    rows = data_ptr + offs_n[:, None].to(tl.int64) * (K // 2)  # int64: N * K / 2 bytes can pass 2^31
    packed = tl.load(rows + offs_b[None, :], mask=byte_mask, other=0x77)
    packed = packed.to(tl.int32)
    if PAIR_LOOKUP:
        # One lookup per byte in the 256-entry pair table (2 KiB, stays in L1): entries 2b, 2b + 1 are the values
        # of columns 2j, 2j + 1 (high nibble first), so the (BLOCK_N, BLOCK_K / 2, 2) gather flattens into k order.
        pair = packed[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
        values = tl.reshape(tl.load(pairs_ptr + pair), (BLOCK_N, BLOCK_K))
    else:
        # One lookup per nibble: entry 2c + 1 of the pair table (byte c < 16: high nibble 0) is NF4[c], so the 16
        # codes sit in its first 128 bytes. Join the nibbles back into k order (column 2j: high nibble of byte j).
        codes = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N, BLOCK_K))
        values = tl.load(pairs_ptr + 2 * codes + 1)
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K <= BLOCKSIZE:
        # The tile lies inside one quantization block per row: one scale per row.
        blk = offs_n * blocks_per_row + k0 // BLOCKSIZE
        scale = _block_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, blk, n_mask, DOUBLE_QUANT)
        return values * scale[:, None]
    else:
        # The tile spans BLOCK_K / BLOCKSIZE whole blocks per row: view it as (BLOCK_N, groups,
        # BLOCKSIZE) and scale each group by its block's scale.
        groups = k0 // BLOCKSIZE + tl.arange(0, BLOCK_K // BLOCKSIZE)
        blk = offs_n[:, None] * blocks_per_row + groups[None, :]
        blk_mask = n_mask[:, None] & (groups < blocks_per_row)[None, :]
        scale = _block_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, blk, blk_mask, DOUBLE_QUANT)
        grouped = tl.reshape(values, (BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None]
        return tl.reshape(grouped, (BLOCK_N, BLOCK_K))
