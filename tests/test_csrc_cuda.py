"""The CUDA kernels of fastllm._C (torch.ops.fastllm.* on the CUDA key) against the CPU ops, the reference and
bitsandbytes' CUDA quantizer.

Bit for bit where the arithmetic is the same: quantize (4-bit codes and fp32 absmax), decode_scales and
dequantize_nf4 in every dtype. Two places differ by design and are checked for what they promise instead:
- The double-quantization offset is the mean of the absmax vector, torch's CUDA mean on CUDA (as bitsandbytes'
  CUDA path computes it) and its CPU mean on the CPU: the two can differ in the last bits. Given the CUDA
  offset, the 8-bit codes and nested scales must be exactly the reference's.
- nf4_gemv sums in another order on each device: it is held to fp32-accumulation tolerances.

The whole file is marked ``gpu`` (``pytest -m gpu`` selects it with the CUDA half of the ``device`` fixture).
Without a CUDA device, or with an extension built without CUDA kernels, it is skipped with that reason (CI's
``-rs`` summary lists it).
"""

from __future__ import annotations

import pytest
import torch
from _metrics import rel_err

from fastllm import _backend, reference
from fastllm.codebook import NESTED_BLOCKSIZE, dynamic_map


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _backend.extension_loaded():
        return f"fastllm._C not loaded: {_backend.extension_error()}"
    if not _backend.cuda_built():
        return "fastllm._C was built without its CUDA kernels (no nvcc at build time, or FASTLLM_NO_CUDA=1)"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ops = torch.ops.fastllm
# (shape, blocksize): short last blocks, a 4096 block, one element, and a weight of many CUDA thread blocks
# whose absmax vector spans several nested blocks of 256.
SHAPES = [((37, 129), 32), ((5, 301), 128), ((3, 1001), 4096), ((1,), 64), ((301, 1024), 64)]


def make_weight(shape: tuple[int, ...], blocksize: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal * 3 in ``dtype`` with one all-zero block, drawn on the CPU."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(3).to(dtype)
    w.view(-1)[: min(blocksize, w.numel())] = 0
    return w


def quantize(w: torch.Tensor, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, ...]:
    """The op's four outputs, moved to the CPU."""
    return tuple(t.cpu() for t in ops.quantize_nf4(w, blocksize, double_quant, dynamic_map(w.device)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "blocksize"), SHAPES)
def test_quantize_equals_cpu_op(dtype, shape, blocksize):
    w = make_weight(shape, blocksize, dtype, seed=blocksize)
    packed, absmax, nested, offset = quantize(w.to(CUDA), blocksize, False)
    cpu = quantize(w, blocksize, False)
    assert torch.equal(packed, cpu[0]) and torch.equal(absmax, cpu[1])
    assert nested.numel() == 0 and offset.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "blocksize"), SHAPES)
def test_double_quant_equals_reference_given_the_cuda_offset(dtype, shape, blocksize):
    w = make_weight(shape, blocksize, dtype, seed=blocksize + 1)
    packed, codes, nested, offset = quantize(w.to(CUDA), blocksize, True)
    ref = reference.quantize_nf4(w, blocksize, False)
    assert torch.equal(packed, ref.packed)
    # torch's CUDA and CPU means of the same fp32 vector agree to rounding.
    assert offset.shape == () and torch.allclose(offset, ref.absmax.mean(), rtol=1e-6, atol=0)
    want_codes, want_nested = reference.quantize_blockwise_8bit(ref.absmax - offset, NESTED_BLOCKSIZE)
    assert torch.equal(codes, want_codes) and torch.equal(nested, want_nested)


@pytest.mark.parametrize(("shape", "blocksize"), SHAPES)
def test_decode_scales_and_dequantize_equal_cpu_ops(shape, blocksize):
    w = make_weight(shape, blocksize, torch.float32, seed=blocksize + 2)
    packed, codes, nested, offset = ops.quantize_nf4(w, blocksize, True, dynamic_map())
    scales = ops.decode_scales(codes, nested, offset, dynamic_map())
    on_cuda = [t.to(CUDA) for t in (packed, codes, nested, offset)]
    cuda_scales = ops.decode_scales(*on_cuda[1:], dynamic_map(CUDA))
    assert torch.equal(cuda_scales.cpu(), scales)
    for dtype in DTYPES:
        got = ops.dequantize_nf4(on_cuda[0], cuda_scales, blocksize, w.numel(), dtype)
        want = ops.dequantize_nf4(packed, scales, blocksize, w.numel(), dtype)
        assert got.dtype == dtype and got.is_cuda and torch.equal(got.cpu(), want), dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "blocksize"), [(37, 192, 64), (101, 160, 32), (9, 4096, 128)])
def test_gemv_matches_cpu_op_and_reference(dtype, n, k, blocksize):
    parts = reference.quantize_nf4(torch.randn(n, k), blocksize, True)
    dense = reference.dequantize_nf4(parts.packed, parts.absmax, parts.nested_absmax, parts.offset, blocksize, (n, k))
    scales = reference.block_scales(parts.absmax, parts.nested_absmax, parts.offset)
    # Every row count the kernel specializes (chunks of 8 rows), a transposed (non-contiguous) x.
    for m in (1, 2, 5, 8, 9, 16, 17):
        x = torch.randn(k, m).T.to(dtype)
        y = ops.nf4_gemv(x.to(CUDA), parts.packed.to(CUDA), scales.to(CUDA), blocksize, n)
        assert y.shape == (m, n) and y.dtype == dtype and y.is_cuda
        cpu = ops.nf4_gemv(x, parts.packed, scales, blocksize, n)
        # fp32 sums in another order; 16-bit outputs may round to the neighbouring value.
        assert rel_err(y.cpu(), cpu) < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], m
        bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert rel_err(y.cpu(), reference.linear(x, dense)) < bound, m


def test_gemv_reads_packed_bytes_at_an_odd_offset():
    """The kernel reads 32-bit words: a view starting at an odd byte must still give the right answer."""
    n, k = 24, 128
    parts = reference.quantize_nf4(torch.randn(n, k), 64, False)
    buffer = torch.zeros(parts.packed.numel() + 1, dtype=torch.uint8)
    buffer[1:] = parts.packed
    packed = buffer.to(CUDA)[1:]
    assert packed.data_ptr() % 4 != 0
    x = torch.randn(3, k)
    y = ops.nf4_gemv(x.to(CUDA), packed, parts.absmax.to(CUDA), 64, n)
    assert torch.allclose(y.cpu(), ops.nf4_gemv(x, parts.packed, parts.absmax, 64, n), rtol=1e-5, atol=1e-5)


def test_gemv_empty_shapes():
    parts = reference.quantize_nf4(torch.randn(8, 64), 32, False)
    y = ops.nf4_gemv(torch.randn(0, 64, device=CUDA), parts.packed.to(CUDA), parts.absmax.to(CUDA), 32, 8)
    assert y.shape == (0, 8) and y.is_cuda


def test_bad_input_on_cuda_raises_naming_the_argument():
    w = torch.randn(64, 64, device=CUDA)
    with pytest.raises(ValueError, match="non-finite"):
        bad = w.clone()
        bad[3, 5] = float("nan")
        ops.quantize_nf4(bad, 64, True, dynamic_map(CUDA))
    with pytest.raises(ValueError, match="dynamic_map must be on the device of weight"):
        ops.quantize_nf4(w, 64, True, dynamic_map(CPU))
    packed, absmax, *_ = ops.quantize_nf4(w, 64, False, dynamic_map(CUDA))
    with pytest.raises(ValueError, match="scales must be on the device of packed"):
        ops.dequantize_nf4(packed, absmax.cpu(), 64, w.numel(), torch.float32)
    with pytest.raises(ValueError, match="packed must be on the device of x"):
        ops.nf4_gemv(torch.randn(2, 64, device=CUDA), packed.cpu(), absmax, 64, 64)


# ---- bitsandbytes' CUDA quantizer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb_cuda():
    """bitsandbytes.functional, when bitsandbytes is installed with a working CUDA backend (else a skip)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    try:
        bnb.functional.quantize_4bit(torch.ones(64, device=CUDA), blocksize=64, quant_type="nf4")
    except Exception as exc:  # no CUDA library in this bitsandbytes build, or it does not load
        pytest.skip(f"bitsandbytes {bnb.__version__} has no working CUDA backend here: {exc}")
    return bnb.functional


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "blocksize"), [((96, 320), 64), ((301, 1024), 64), ((33, 384), 128)])
def test_quantize_equals_bitsandbytes_cuda(bnb_cuda, dtype, shape, blocksize):
    """4-bit codes and the fp32 absmax are bnb's bytes; with double quantization the offset too (both take
    torch's CUDA mean). bnb's CUDA 8-bit quantizer rounds to the nearest code directly, where bnb's CPU
    quantizer, the reference and our kernels round through a 65536-point grid first: our nested scales must be
    no farther from the true (absmax - offset) than bnb's plus two grid steps. (No all-zero block here: bnb's
    CUDA kernel gives its elements an arbitrary code, harmless since they dequantize to 0 whatever the code.)"""
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 3).to(dtype).to(CUDA)
    for double_quant in (False, True):
        theirs_packed, state = bnb_cuda.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )
        packed, absmax, nested, offset = ops.quantize_nf4(w, blocksize, double_quant, dynamic_map(CUDA))
        assert torch.equal(packed, theirs_packed.reshape(-1))
        if not double_quant:
            assert torch.equal(absmax, state.absmax)
            continue
        assert torch.equal(offset.reshape(()), state.offset.reshape(()).float())
        plain = ops.quantize_nf4(w, blocksize, False, dynamic_map(CUDA))[1]  # the fp32 absmax
        truth = (plain - offset).double()
        ours = reference.dequantize_blockwise_8bit(absmax, nested, NESTED_BLOCKSIZE)
        theirs = bnb_cuda.dequantize_blockwise(state.absmax, state.state2).float()
        step = 2 / 65535 * nested.repeat_interleave(NESTED_BLOCKSIZE)[: plain.numel()].double()
        slack = (theirs.double() - truth).abs() + 2 * step + 1e-7 * truth.abs()
        assert ((ours.double() - truth).abs() <= slack).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_equals_bitsandbytes_cuda(bnb_cuda, dtype):
    """bnb's CUDA dequantize of our tensors gives our CUDA dequantize, bit for bit, with and without nesting."""
    shape, blocksize = (301, 1024), 64
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(11)) * 3).to(CUDA)
    for double_quant in (False, True):
        _, state = bnb_cuda.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        packed, absmax, nested, offset = ops.quantize_nf4(w, blocksize, double_quant, dynamic_map(CUDA))
        state.absmax, state.dtype = absmax, dtype
        if double_quant:
            state.state2.absmax, state.offset = nested, offset
            scales = ops.decode_scales(absmax, nested, offset, dynamic_map(CUDA))
        else:
            scales = absmax
        theirs = bnb_cuda.dequantize_4bit(packed.reshape(-1, 1), state)
        ours = ops.dequantize_nf4(packed, scales, blocksize, w.numel(), dtype)
        assert theirs.dtype == dtype and torch.equal(ours, theirs.reshape(-1)), double_quant
