"""NF4 dequantize-matmul kernels (fastllm.kernels.nf4_matmul) against fastllm.reference in fp64.

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
there tl.dot is only trusted in fp16/fp32, so bf16 is checked on the CPU (C++/torch) path. That the kernels
compile for a GPU (bf16 included) is checked by tests/test_gpu_compile.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch
from _metrics import rel_err

from fastllm import _backend, nf4, reference
from fastllm.kernels import nf4_dequantize, nf4_matmul, nf4_matmul_t
from fastllm.ops import nf4 as nf4_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def make_weight(n: int, k: int, blocksize: int, double_quant: bool, seed: int) -> nf4.NF4Weight:
    gen = torch.Generator().manual_seed(seed)
    return nf4.quantize(torch.randn(n, k, generator=gen), blocksize, double_quant).to(DEVICE)


def check_forward_backward(lead: tuple[int, ...], n: int, w: nf4.NF4Weight, dtype: torch.dtype, use_bias: bool):
    """nf4_matmul forward, grad_x and grad_bias against fp64 reference math on the dequantized weight."""
    k, device = w.shape[1], w.device
    dense = w.dequantize(torch.float32)
    x = torch.randn(*lead, k, device=device).to(dtype).requires_grad_()
    bias = torch.randn(n, device=device).to(dtype).requires_grad_() if use_bias else None
    y = nf4_matmul(x, w, bias)
    assert y.shape == (*lead, n) and y.dtype == dtype
    ref = reference.linear(x.detach(), dense, None if bias is None else bias.detach())
    assert rel_err(y, ref) < TOL[dtype], f"forward rel err {rel_err(y, ref):.2e}"

    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    grad_x_ref = grad_y.double() @ dense.double()
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, grad_x_ref) < TOL[dtype], f"grad_x rel err {rel_err(x.grad, grad_x_ref):.2e}"
    if use_bias:
        grad_b_ref = grad_y.double().reshape(-1, n).sum(0)
        assert rel_err(bias.grad, grad_b_ref) < TOL[dtype], f"grad_bias rel err {rel_err(bias.grad, grad_b_ref):.2e}"


# Leading dims of x: M = 1, 3, 16 (split-K decode kernel), 17 and 2 x 65 = 130 (tiled GEMM).
LEADS = [(1,), (3,), (16,), (1, 17), (2, 65)]
# (blocksize, N, K): N never a multiple of a tile; K = 96 is not a multiple of the 64-wide K tile.
SHAPES = [(32, 97, 96), (64, 75, 192), (128, 130, 128)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("blocksize,n,k", SHAPES)
def test_matmul_forward_backward(lead, blocksize, n, k, dtype):
    for seed, (double_quant, use_bias) in enumerate(itertools.product([False, True], [False, True])):
        w = make_weight(n, k, blocksize, double_quant, seed)
        check_forward_backward(lead, n, w, dtype, use_bias)


def test_matmul_many_row_tiles():
    # 300 rows = 10 row tiles of the interpreter's GEMM config: two bands of the grouped launch order.
    w = make_weight(97, 96, 32, True, seed=5)
    check_forward_backward((3, 100), 97, w, torch.float16, use_bias=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_matmul_t_matches_reference_and_is_differentiable(dtype):
    w = make_weight(83, 192, 64, True, seed=7)
    dense = w.dequantize(torch.float32).double()
    grad_y = torch.randn(2, 9, 83, device=DEVICE).to(dtype).requires_grad_()
    out = nf4_matmul_t(grad_y, w)
    assert out.shape == (2, 9, 192) and out.dtype == dtype
    assert rel_err(out, grad_y.detach().double() @ dense) < TOL[dtype]
    # grad_y @ W is linear in grad_y: its own gradient is upstream @ W^T.
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert rel_err(grad_y.grad, upstream.double() @ dense.T) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 128])
def test_dequantize_matches_reference_bit_for_bit(blocksize, double_quant, dtype):
    w = make_weight(37, blocksize * 3, blocksize, double_quant, seed=blocksize)
    out = nf4_dequantize(w, dtype)
    ref = reference.dequantize_nf4(
        w.data.cpu(),
        w.absmax.cpu(),
        None if w.nested_absmax is None else w.nested_absmax.cpu(),
        None if w.offset is None else w.offset.cpu(),
        blocksize,
        w.shape,
        dtype,
    )
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.cpu(), ref)


@pytest.fixture
def cpu_path():
    """Route CPU tensors to the ops' own CPU implementation (C++ / torch), as on a machine without TRITON_INTERPRET:
    the Triton kernels registered for CPU under the interpreter are switched off for the test."""
    with contextlib.ExitStack() as stack:
        for op in (nf4_ops.nf4_matmul, nf4_ops.nf4_matmul_t, nf4_ops.nf4_dequantize):
            stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead", [(1,), (5,), (16,), (3, 13)], ids=str)
def test_cpu_path_forward_backward(cpu_path, lead, dtype):
    # M <= 16 uses fastllm::nf4_gemv when the extension has it (dequantize + matmul otherwise).
    for seed, double_quant in enumerate([False, True]):
        w = nf4.quantize(torch.randn(70, 128, generator=torch.Generator().manual_seed(seed)), 64, double_quant)
        x = torch.randn(*lead, 128).to(dtype)
        y = nf4_ops.cpu_forward(x.reshape(-1, 128), w.tensors(), None, 64, 70)
        assert y.dtype == dtype
        assert rel_err(y, reference.linear(x.reshape(-1, 128), w.dequantize(torch.float32))) < TOL[dtype]
        check_forward_backward(lead, 70, w, dtype, use_bias=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpu_path_banded_large_m(cpu_path, monkeypatch, dtype):
    # Large M dequantizes W a band at a time; tiny bands give many row bands (forward) and several
    # column bands of whole blocks (backward), the last ones partial.
    if not _backend.has_op("dequantize_nf4", "cpu"):
        pytest.skip(f"the banded path needs the C++ extension: {_backend.extension_error()}")
    monkeypatch.setattr(nf4_ops, "_CPU_BAND_BYTES", 4096)
    w = nf4.quantize(torch.randn(70, 192, generator=torch.Generator().manual_seed(3)), 64, True)
    x = torch.randn(41, 192).to(dtype)
    y = nf4_ops.cpu_forward(x, w.tensors(), None, 64, 70)
    assert rel_err(y, reference.linear(x, w.dequantize(torch.float32))) < TOL[dtype]
    g = torch.randn(41, 70).to(dtype)
    grad_x = nf4_ops.cpu_backward(g, w.tensors(), 64, 192)
    assert rel_err(grad_x, g.double() @ w.dequantize(torch.float32).double()) < TOL[dtype]


class _NF4Block(torch.nn.Module):
    def __init__(self, w: nf4.NF4Weight, n: int):
        super().__init__()
        self.w = w
        self.bias = torch.nn.Parameter(torch.randn(n, device=DEVICE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(nf4_matmul(x, self.w, self.bias)) * 0.5


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    block = _NF4Block(make_weight(80, 128, 64, True, seed=3), 80)
    x = torch.randn(2, 7, 128, device=DEVICE, requires_grad=True)
    eager = block(x)
    eager.sum().backward()
    grads_eager = (x.grad.clone(), block.bias.grad.clone())
    x.grad = block.bias.grad = None

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert rel_err(out, eager) < 1e-6
    assert rel_err(x.grad, grads_eager[0]) < 1e-6
    assert rel_err(block.bias.grad, grads_eager[1]) < 1e-6
    explain = torch._dynamo.explain(block)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.fixture(scope="module")
def weight():
    return make_weight(48, 128, 64, False, seed=11)


def test_rejects_in_features_mismatch(weight):
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 128\)"):
        nf4_matmul(torch.randn(4, 96, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(\.\.\., 48\)"):
        nf4_matmul_t(torch.randn(4, 128, device=DEVICE), weight)


def test_rejects_k_not_multiple_of_blocksize():
    w = make_weight(16, 100, 64, True, seed=0)
    with pytest.raises(ValueError, match="K=100 .* multiple of blocksize=64"):
        nf4_matmul(torch.randn(2, 100, device=DEVICE), w)
    with pytest.raises(ValueError, match="K=100 .* multiple of blocksize=64"):
        nf4_dequantize(w, torch.float32)


def test_rejects_bad_bias(weight):
    x = torch.randn(3, 128, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must have shape \(48,\), dtype torch.float32"):
        nf4_matmul(x, weight, torch.randn(48, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"bias must have shape \(48,\)"):
        nf4_matmul(x, weight, torch.randn(47, device=DEVICE))


def test_rejects_inconsistent_weight_tensors(weight):
    x = torch.randn(2, 128, device=DEVICE)
    with pytest.raises(ValueError, match=r"w.data must be uint8 with N\*K/2 = 3072 bytes"):
        nf4_matmul(x, dataclasses.replace(weight, data=weight.data[:-2]))
    with pytest.raises(ValueError, match=r"w.absmax must be torch.float32 with N\*K/blocksize = 96 entries"):
        nf4_matmul(x, dataclasses.replace(weight, absmax=weight.absmax[:90]))


def test_rejects_non_float_input_and_non_nf4_weight(weight):
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        nf4_matmul(torch.ones(2, 128, dtype=torch.int64, device=DEVICE), weight)
    with pytest.raises(TypeError, match="w must be a fastllm.nf4.NF4Weight"):
        nf4_matmul(torch.randn(2, 128, device=DEVICE), torch.randn(48, 128))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        nf4_dequantize(weight, torch.int32)
