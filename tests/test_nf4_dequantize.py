"""fastllm.kernels.nf4_dequantize: bit for bit the reference's dense weight, in fp32, fp16 and bf16.

The kernel computes each element as NF4[code] * scale in fp32 (the nested scale DYNAMIC[q] * nested + offset
rounded twice, FMA contraction off) and casts once, exactly as ``fastllm.reference.dequantize_nf4``. It has no
``tl.dot``, so the interpreter runs the same fp32 arithmetic the GPU does: fp32 and fp16 are exact here and on
CUDA. bf16 is exact on CUDA (round-to-nearest-even cast); the Triton interpreter (3.9) casts fp32 to bf16 by
truncation, even when asked for "rtne", so there the bf16 case is an expected failure (strict: it will say when
the interpreter is fixed) and a separate test pins what it does. On a GPU machine the ``cpu`` half runs the C++
dequantize (the path CPU tensors take there), exact in every dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastllm import nf4, reference
from fastllm.kernels import nf4_dequantize

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, K, blocksize): N never a multiple of the kernel's 32-row tile; K = 96 is not a multiple of its 64-wide K tile
# (a masked tile); blocks narrower than, as wide as and wider than the K tile; (130, 512, 32) has 2080 blocks,
# so the nested scales of 9 groups of 256 are read.
SHAPES = [(97, 96, 32), (75, 192, 64), (33, 256, 128), (5, 512, 256), (1, 128, 64), (130, 512, 32)]


def make_weight(n: int, k: int, blocksize: int, double_quant: bool) -> nf4.NF4Weight:
    """NF4 of a normal (N, K) weight * 3 with its first block all zero, quantized on the CPU."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + blocksize)) * 3
    weight.view(-1)[:blocksize] = 0
    return nf4.quantize(weight, blocksize, double_quant)


def reference_dense(w: nf4.NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return reference.dequantize_nf4(w.data, w.absmax, w.nested_absmax, w.offset, w.blocksize, w.shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("n,k,blocksize", SHAPES)
def test_bit_identical_to_reference(device, n, k, blocksize, double_quant, dtype):
    # bf16 too under the interpreter: Triton 3.9's interpreter casts fp32 -> bf16 by truncation, so the kernel
    # rounds to nearest-even on the bit pattern there (BF16_BY_BITS) and the cast is exact on every path.
    w = make_weight(n, k, blocksize, double_quant)
    got = nf4_dequantize(w.to(device), dtype)
    assert got.shape == (n, k) and got.dtype == dtype and got.device.type == device.type
    assert torch.equal(got.cpu(), reference_dense(w, dtype))


def test_default_dtype_is_the_weights(device):
    weight = torch.randn(40, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    w = nf4.quantize(weight, 64, True)
    got = nf4_dequantize(w.to(device))
    assert got.dtype == torch.float16 and torch.equal(got.cpu(), reference_dense(w, torch.float16))


def test_bad_input_raises_naming_the_argument(device):
    w = make_weight(8, 64, 32, True).to(device)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        nf4_dequantize(w, torch.int32)
    with pytest.raises(TypeError, match="w must be a fastllm.nf4.NF4Weight"):
        nf4_dequantize(torch.zeros(8, 64, device=device))
    odd = nf4.quantize(torch.randn(8, 72), 64, True).to(device)  # K = 72 is not a multiple of the blocksize
    with pytest.raises(ValueError, match="multiple of blocksize"):
        nf4_dequantize(odd)
