"""The C++/CUDA extension fastllm._C: that it loaded (and built its CUDA kernels where CUDA exists), tables, ops
against fastllm.reference, bad input, CUDA compile. The CUDA kernels' numerics: tests/test_csrc_cuda.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from _metrics import rel_err

from fastllm import _backend, reference
from fastllm.codebook import NF4_CODE, dynamic_map

# Every test but the first two needs the extension; the first fails when it did not load without being told not to.
needs_extension = pytest.mark.skipif(not _backend.extension_loaded(), reason=f"{_backend.extension_error()}")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ops = torch.ops.fastllm


def test_extension_loaded_unless_disabled_on_purpose():
    """A broken build must not pass as a row of skips: fastllm._C loads unless FASTLLM_DISABLE_EXT=1 asks not to."""
    if os.environ.get("FASTLLM_DISABLE_EXT") == "1":
        assert not _backend.extension_loaded()
        assert "FASTLLM_DISABLE_EXT" in _backend.extension_error()
        return
    assert _backend.extension_loaded(), f"fastllm._C did not load: {_backend.extension_error()}"
    assert all(_backend.has_op(op, "cpu") for op in _backend.EXTENSION_OPS)


@pytest.mark.gpu
def test_cuda_kernels_built_where_cuda_exists():
    """On a CUDA machine with nvcc the extension carries its CUDA kernels, unless FASTLLM_NO_CUDA=1 asked not to."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA kernels have nothing to run on")
    if os.environ.get("FASTLLM_DISABLE_EXT") == "1" or os.environ.get("FASTLLM_NO_CUDA") == "1":
        pytest.skip("FASTLLM_DISABLE_EXT=1 or FASTLLM_NO_CUDA=1: built without CUDA kernels on purpose")
    from torch.utils.cpp_extension import CUDA_HOME

    if shutil.which("nvcc") is None and not (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        pytest.skip("no nvcc on this machine: the CUDA kernels cannot be built here")
    assert _backend.extension_loaded(), f"fastllm._C did not load: {_backend.extension_error()}"
    assert _backend.cuda_built(), "fastllm._C was built without its CUDA kernels although CUDA and nvcc exist"
    assert all(_backend.has_op(op, "cuda") for op in _backend.EXTENSION_OPS)


@needs_extension
def test_cpp_code_table_equals_python_table():
    from fastllm import _C

    table = _C.nf4_code_table()
    assert table.dtype == torch.float32
    assert torch.equal(table, torch.tensor(NF4_CODE, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "blocksize"), [((37, 129), 32), ((5, 301), 128), ((3, 1001), 4096), ((1,), 64)])
@needs_extension
def test_ops_match_reference_bit_for_bit(dtype, shape, blocksize):
    w = torch.randn(shape, dtype=torch.float32).mul_(3).to(dtype)
    w.view(-1)[: min(blocksize, w.numel())] = 0  # an all-zero block
    for double_quant in (False, True):
        packed, absmax, nested, offset = ops.quantize_nf4(w, blocksize, double_quant, dynamic_map())
        ref = reference.quantize_nf4(w, blocksize, double_quant)
        assert torch.equal(packed, ref.packed)
        assert torch.equal(absmax, ref.absmax)
        if double_quant:
            assert torch.equal(nested, ref.nested_absmax) and torch.equal(offset, ref.offset)
            scales = ops.decode_scales(absmax, nested, offset, dynamic_map())
        else:
            assert nested.numel() == 0 and offset.numel() == 0
            scales = absmax
        assert torch.equal(scales, reference.block_scales(ref.absmax, ref.nested_absmax, ref.offset))
        for out_dtype in DTYPES:
            got = ops.dequantize_nf4(packed, scales, blocksize, w.numel(), out_dtype)
            want = reference.dequantize_nf4(packed, absmax, ref.nested_absmax, ref.offset, blocksize, shape, out_dtype)
            assert got.dtype == out_dtype and torch.equal(got, want.reshape(-1))


@needs_extension
def test_quantize_ties_and_tiny_values_match_reference():
    # Values exactly on the code midpoints (block absmax 1, so the scale is exact) go to the
    # lower code; subnormal and tiny blocks exercise the 1e-38 clamp of the scale.
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2
    block = torch.cat([torch.ones(1), mid, -mid, torch.zeros(64 - 31)])
    tiny = torch.full((64,), 1e-40).mul_(torch.randn(64).sign())
    w = torch.cat([block, tiny, torch.randn(64) * 1e-30, torch.randn(64) * 1e30])
    packed, absmax, *_ = ops.quantize_nf4(w, 64, False, dynamic_map())
    ref = reference.quantize_nf4(w, 64, False)
    assert torch.equal(packed, ref.packed) and torch.equal(absmax, ref.absmax)
    codes = reference.unpack_nibbles(packed, w.numel())
    assert torch.equal(codes[1:16].long(), torch.arange(15))  # each midpoint -> lower neighbour


# Outputs of 32 MiB and more come from csrc/large_alloc.cpp (2 MiB-aligned, huge pages on Linux).
# Odd numel with a short last block: bf16 output just over 32 MiB, fp32 over 64 MiB.
LARGE_NUMEL = (16 << 20) + 1037
HUGE_PAGE = 2 << 20


@needs_extension
def test_large_dequantize_output_matches_reference_and_is_a_normal_tensor():
    w = torch.randn(LARGE_NUMEL)
    packed, absmax, nested, offset = ops.quantize_nf4(w, 64, True, dynamic_map())
    scales = ops.decode_scales(absmax, nested, offset, dynamic_map())
    for dtype in (torch.bfloat16, torch.float32):
        got = ops.dequantize_nf4(packed, scales, 64, LARGE_NUMEL, dtype)
        want = reference.dequantize_nf4(packed, absmax, nested, offset, 64, (LARGE_NUMEL,), dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        if sys.platform.startswith("linux"):
            assert got.data_ptr() % HUGE_PAGE == 0, "expected the huge-page allocator"
    # Its storage's allocator serves a resize like torch's own: the values stay.
    got.resize_(LARGE_NUMEL + HUGE_PAGE)
    assert torch.equal(got[:LARGE_NUMEL], want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc/self/statm")
@needs_extension
def test_large_dequantize_output_memory_is_released():
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    packed = torch.randint(0, 256, ((LARGE_NUMEL + 1) // 2,), dtype=torch.uint8)
    scales = torch.rand(-(-LARGE_NUMEL // 64))
    ops.dequantize_nf4(packed, scales, 64, LARGE_NUMEL, torch.bfloat16)
    before = rss_bytes()
    for _ in range(32):
        out = ops.dequantize_nf4(packed, scales, 64, LARGE_NUMEL, torch.bfloat16)
        assert out.abs().max() > 0  # touched and alive here
        del out
    # 32 outputs that were never freed would add over 1 GiB.
    assert rss_bytes() - before < 128 << 20


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "blocksize"), [(1, 37, 192, 64), (3, 101, 160, 32), (17, 9, 256, 128)])
@needs_extension
def test_gemv_matches_reference_linear(dtype, m, n, k, blocksize):
    w = torch.randn(n, k)
    parts = reference.quantize_nf4(w, blocksize, True)
    dense = reference.dequantize_nf4(parts.packed, parts.absmax, parts.nested_absmax, parts.offset, blocksize, (n, k))
    scales = reference.block_scales(parts.absmax, parts.nested_absmax, parts.offset)
    x = torch.randn(m, k).to(dtype)
    y = ops.nf4_gemv(x, parts.packed, scales, blocksize, n)
    assert y.shape == (m, n) and y.dtype == dtype
    # fp32 accumulation; the output rounding (and, for bf16 x, bf16 weights) bound the error.
    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(y, reference.linear(x, dense)) < bound


@needs_extension
def test_gemv_every_m_and_non_contiguous_x():
    n, k, blocksize = 24, 128, 64
    parts = reference.quantize_nf4(torch.randn(n, k), blocksize, False)
    dense = reference.dequantize_nf4(parts.packed, parts.absmax, None, None, blocksize, (n, k))
    for m in (0, 2, 5, 8, 9, 16, 33):
        x = torch.randn(k, m).T  # a transposed view
        y = ops.nf4_gemv(x, parts.packed, parts.absmax, blocksize, n)
        assert y.shape == (m, n)
        if m:
            assert rel_err(y, reference.linear(x, dense)) < 1e-5


@needs_extension
def test_op_fake_kernels_pass_opcheck():
    # Schema, fake (meta) kernels and AOT tracing: what torch.compile relies on.
    w = torch.randn(40, 128)
    dmap = dynamic_map()
    packed, absmax, nested, offset = ops.quantize_nf4(w, 64, True, dmap)
    scales = ops.decode_scales(absmax, nested, offset, dmap)
    cases = [
        (ops.quantize_nf4.default, (w, 64, True, dmap)),
        (ops.quantize_nf4.default, (w.bfloat16(), 32, False, dmap)),
        (ops.decode_scales.default, (absmax, nested, offset, dmap)),
        (ops.dequantize_nf4.default, (packed, scales, 64, w.numel(), torch.bfloat16)),
        (ops.nf4_gemv.default, (torch.randn(3, 128), packed, scales, 64, 40)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def _valid_gemv_args():
    parts = reference.quantize_nf4(torch.randn(8, 64), 32, False)
    return torch.randn(2, 64), parts.packed, parts.absmax


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.quantize_nf4(torch.ones(64, dtype=torch.int32), 64, False, dynamic_map()), TypeError, "weight"),
        (lambda: ops.quantize_nf4(torch.ones(64), 48, False, dynamic_map()), ValueError, "blocksize"),
        (lambda: ops.quantize_nf4(torch.ones(0), 64, False, dynamic_map()), ValueError, "empty"),
        (lambda: ops.quantize_nf4(torch.ones(64), 64, True, dynamic_map()[:255]), ValueError, "dynamic_map"),
        (lambda: ops.quantize_nf4(torch.ones(64), 64, True, dynamic_map().double()), TypeError, "dynamic_map"),
        (
            lambda: ops.dequantize_nf4(torch.zeros(4, dtype=torch.int32), torch.ones(1), 32, 8, torch.float32),
            TypeError,
            "packed",
        ),
        (
            lambda: ops.dequantize_nf4(torch.zeros(4, dtype=torch.uint8), torch.ones(1), 32, 9, torch.float32),
            ValueError,
            "packed",
        ),
        (
            lambda: ops.dequantize_nf4(torch.zeros(40, dtype=torch.uint8), torch.ones(1), 32, 80, torch.float32),
            ValueError,
            "scales",
        ),
        (  # numel + 1 would overflow int64: still a clean error, never a wrapped size
            lambda: ops.dequantize_nf4(torch.zeros(4, dtype=torch.uint8), torch.ones(1), 32, 2**63 - 1, torch.float32),
            ValueError,
            "packed must hold at least",
        ),
        (
            lambda: ops.dequantize_nf4(torch.zeros(4, dtype=torch.uint8), torch.ones(1), 32, 8, torch.int32),
            TypeError,
            "dtype",
        ),
        (
            lambda: ops.decode_scales(
                torch.zeros(300, dtype=torch.uint8), torch.ones(1), torch.zeros(()), dynamic_map()
            ),
            ValueError,
            "nested_absmax",
        ),
    ],
)
@needs_extension
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@needs_extension
def test_gemv_bad_input_raises_naming_the_argument():
    x, packed, scales = _valid_gemv_args()
    with pytest.raises(ValueError, match="multiple of blocksize"):
        ops.nf4_gemv(torch.randn(2, 48), packed[:192], scales[:12], 32, 8)
    with pytest.raises(TypeError, match="x must be"):
        ops.nf4_gemv(x.long(), packed, scales, 32, 8)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.nf4_gemv(x[None], packed, scales, 32, 8)
    with pytest.raises(TypeError, match="packed"):
        ops.nf4_gemv(x, packed.int(), scales, 32, 8)
    with pytest.raises(TypeError, match="scales"):
        ops.nf4_gemv(x, packed, scales.half(), 32, 8)
    with pytest.raises(ValueError, match="packed must hold"):
        ops.nf4_gemv(x, packed[:-1], scales, 32, 8)
    with pytest.raises(ValueError, match="scales must hold"):
        ops.nf4_gemv(x, packed, scales[:-1], 32, 8)
    with pytest.raises(ValueError, match="overflows int64"):
        ops.nf4_gemv(x, packed, scales, 32, 2**62)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@needs_extension
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    cmd = [
        "nvcc", "-c", "-std=c++17", "-O3",
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-I", CSRC, os.path.join(CSRC, "nf4_cuda.cu"), "-o", str(tmp_path / "nf4_cuda.o"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "nf4_cuda.o").stat().st_size > 0
