"""NF4 dequantize-matmul kernels (fastllm.kernels.nf4_matmul) against fastllm.reference in fp64.

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
there tl.dot is only trusted in fp16/fp32, so bf16 is checked on the CPU (C++/torch) path. That the kernels
compile for a GPU (bf16 included) is checked by tests/test_gpu_compile.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools

import pytest
import torch
from _metrics import rel_err

from fastllm import _backend, nf4, reference
from fastllm.kernels import nf4_dequantize, nf4_matmul, nf4_matmul_t
from fastllm.nf4 import NF4Weight
from fastllm.ops import gemm_choice
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


# No tl.dot in the dequantize kernel, so bf16 is exact under the interpreter too.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 128])
def test_dequantize_matches_reference_bit_for_bit(blocksize, double_quant, dtype):
    # 37 rows and 3 blocks of columns: partial tiles in both directions for every tile config.
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


@pytest.mark.parametrize("pair_lookup", [True, False], ids=["pair-table", "nibble-table"])
def test_dequantize_kernel_lookups_are_bit_exact(monkeypatch, pair_lookup):
    # Both codebook lookups the dequantize kernel's autotuner chooses between, into a preallocated buffer.
    dense = importlib.import_module("fastllm.kernels.nf4_dense")
    monkeypatch.setattr(dense, "_INTERPRETER_TILE", (16, 128, 4, pair_lookup))
    dense._tuner.cache_clear()
    try:
        w = make_weight(21, 320, 64, True, seed=5)
        for dtype in (torch.bfloat16, torch.float16):
            out = dense.dequantize_into(torch.empty(21, 320, dtype=dtype, device=DEVICE), w.tensors(), 64)
            ref = reference.dequantize_nf4(*(t.cpu() for t in w.tensors()), 64, w.shape, dtype)
            assert torch.equal(out.cpu(), ref)
    finally:
        dense._tuner.cache_clear()


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


# The dtype the CPU paths multiply 16-bit inputs in: fp32 (CPUs without native 16-bit matmuls, as this one) or the
# inputs' own (CPUs with them); both are checked whatever this CPU has.
MATMUL_DTYPES = {"in-fp32": lambda dtype: torch.float32, "in-own-dtype": lambda dtype: dtype}


@pytest.mark.parametrize("compute", list(MATMUL_DTYPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cpu_path_banded_large_m(cpu_path, monkeypatch, dtype, compute):
    # Large M dequantizes W a band at a time; tiny bands give many row bands (forward) and several
    # column bands of whole blocks (backward), the last ones partial.
    if not _backend.has_op("dequantize_nf4", "cpu"):
        pytest.skip(f"the banded path needs the C++ extension: {_backend.extension_error()}")
    monkeypatch.setattr(nf4_ops, "_CPU_BAND_BYTES", 4096)
    monkeypatch.setattr(nf4_ops, "matmul_dtype", MATMUL_DTYPES[compute])
    monkeypatch.setenv("FASTLLM_NF4_GEMM", "fused")
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


# ---- decode GEMV paths ----------------------------------------------------------------------------------------


@pytest.fixture
def tuner_calls(monkeypatch):
    """The (kind, fp32, output mode) of every fused-kernel launch of the test."""
    fused = importlib.import_module("fastllm.kernels.nf4_fused")
    calls = []
    tuner = fused._tuner

    def spy(kind, fp32, out_mode=fused._STORE):
        calls.append((kind, out_mode))
        return tuner(kind, fp32, out_mode)

    monkeypatch.setattr(fused, "_tuner", spy)
    return calls


@pytest.mark.parametrize("env", [False, True], ids=["use_deterministic_algorithms", "FASTLLM_DETERMINISTIC"])
def test_deterministic_gemv_is_bitwise_repeatable_and_correct(monkeypatch, tuner_calls, env):
    # N = 97 gives too few N tiles for two waves: the split-K GEMV, here storing partials (no atomics).
    fused = importlib.import_module("fastllm.kernels.nf4_fused")
    w = make_weight(97, 192, 64, True, seed=21)
    x = torch.randn(3, 192, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(97, device=DEVICE, dtype=torch.float16)
    with contextlib.ExitStack() as stack:
        if env:
            monkeypatch.setenv("FASTLLM_DETERMINISTIC", "1")
        else:
            stack.callback(torch.use_deterministic_algorithms, False)
            torch.use_deterministic_algorithms(True)
        outs = [nf4_matmul(x, w, bias) for _ in range(3)]
    assert tuner_calls == [("split_k", fused._PARTIALS)] * 3
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    ref = reference.linear(x, w.dequantize(torch.float32), bias)
    assert rel_err(outs[0], ref) < TOL[torch.float16]


def test_gemv_atomic_split_k_by_default(tuner_calls):
    fused = importlib.import_module("fastllm.kernels.nf4_fused")
    w = make_weight(97, 192, 64, False, seed=22)
    x = torch.randn(2, 192, device=DEVICE)
    y = nf4_matmul(x, w)
    assert tuner_calls == [("split_k", fused._ATOMIC)]
    assert rel_err(y, reference.linear(x, w.dequantize(torch.float32))) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gemv_direct_store_when_n_tiles_fill_two_waves(monkeypatch, tuner_calls, dtype):
    # With one SM, 75 rows of W give 3 tiles of 32 rows >= 2 waves: SPLIT_K = 1, y stored in its dtype.
    fused = importlib.import_module("fastllm.kernels.nf4_fused")
    monkeypatch.setattr(fused, "num_sms", lambda device: 1)
    w = make_weight(75, 192, 64, True, seed=23)
    check_forward_backward((5,), 75, w, dtype, use_bias=True)
    assert tuner_calls[0] == ("small_m", fused._STORE)


# ---- large M: dequantize + matmul vs fused, chosen per key -----------------------------------------------------


@pytest.fixture
def fresh_choices():
    """Empty the per-process path choices around the test."""
    for chooser in (gemm_choice.GPU_GEMM, gemm_choice.CPU_GEMM):
        chooser.choices.clear()
        chooser.timings.clear()
    yield
    for chooser in (gemm_choice.GPU_GEMM, gemm_choice.CPU_GEMM):
        chooser.choices.clear()
        chooser.timings.clear()


@pytest.fixture
def scratch_calls(monkeypatch):
    """Shapes (n, k, dtype) of every dequantize-to-scratch of the test (the dequant path's Triton kernel)."""
    dispatch = importlib.import_module("fastllm.kernels.nf4_dispatch")
    calls = []
    real = dispatch.dequantize_to_scratch

    def spy(tensors, blocksize, n, k, dtype):
        calls.append((n, k, dtype))
        return real(tensors, blocksize, n, k, dtype)

    monkeypatch.setattr(dispatch, "dequantize_to_scratch", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead", [(1, 17), (2, 65)], ids=str)
@pytest.mark.parametrize("blocksize,n,k", SHAPES)
def test_dequant_matmul_path_matches_reference(monkeypatch, scratch_calls, lead, blocksize, n, k, dtype):
    monkeypatch.setenv("FASTLLM_NF4_GEMM", "dequant")
    for seed, double_quant in enumerate([False, True]):
        w = make_weight(n, k, blocksize, double_quant, seed)
        check_forward_backward(lead, n, w, dtype, use_bias=True)
    # forward and grad_x of both weights each dequantized W once into the scratch buffer
    assert scratch_calls == [(n, k, dtype)] * 4


def test_fused_override_never_dequantizes(monkeypatch, scratch_calls, fresh_choices):
    monkeypatch.setenv("FASTLLM_NF4_GEMM", "fused")
    w = make_weight(75, 192, 64, True, seed=4)
    check_forward_backward((2, 20), 75, w, torch.float16, use_bias=False)
    assert scratch_calls == [] and gemm_choice.GPU_GEMM.choices == {}


def test_bad_override_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTLLM_NF4_GEMM", "cublas")
    w = make_weight(75, 192, 64, True, seed=4)
    with pytest.raises(ValueError, match="FASTLLM_NF4_GEMM must be one of auto, fused, dequant; got 'cublas'"):
        nf4_matmul(torch.randn(20, 192, device=DEVICE), w)


def test_chooser_keeps_the_faster_path_per_key():
    # A timer that reports the fused path 5x slower: auto picks "dequant", returns its output, and from then
    # on runs only that path for the key; another key is measured again.
    runs = []

    def path(name, value):
        def fn():
            runs.append(name)
            return torch.tensor(value)

        return fn

    chooser = gemm_choice.PathChooser(lambda device: True)
    chooser.timer = lambda fn, device: ((5.0 if fn().item() == 1.0 else 1.0), fn())
    paths = {"fused": path("fused", 1.0), "dequant": path("dequant", 2.0)}
    assert chooser.run("a", paths, torch.device("cpu")).item() == 2.0
    assert chooser.choices == {"a": "dequant"} and chooser.timings == {"a": {"fused": 5.0, "dequant": 1.0}}
    runs.clear()
    assert chooser.run("a", paths, torch.device("cpu")).item() == 2.0
    assert runs == ["dequant"]
    # Timing not allowed (e.g. CUDA graph capture): the default path runs and nothing is cached.
    blocked = gemm_choice.PathChooser(lambda device: False)
    assert blocked.run("a", paths, torch.device("cpu")).item() == 1.0 and blocked.choices == {}


def test_m_bucket():
    assert [gemm_choice.m_bucket(m) for m in (1, 16, 17, 130, 4096, 4097, 10**6)] == [1, 16, 32, 256, 4096, 8192, 16384]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpu_chooser_measures_at_first_use(cpu_path, fresh_choices, dtype):
    # On the CPU (no interpreter) auto times the banded path and the whole-weight dequantize + GEMM, forward and
    # backward, records both and keeps one; every path agrees with the reference.
    if not _backend.has_op("dequantize_nf4", "cpu"):
        pytest.skip(f"the CPU paths need the C++ extension: {_backend.extension_error()}")
    w = nf4.quantize(torch.randn(70, 192, generator=torch.Generator().manual_seed(8)), 64, True)
    check_forward_backward((41,), 70, w, dtype, use_bias=True)
    keys = {("fwd", 64, 70, 192, dtype, torch.device("cpu")), ("bwd", 64, 70, 192, dtype, torch.device("cpu"))}
    assert set(gemm_choice.CPU_GEMM.timings) == keys
    assert all(set(t) == {"fused", "dequant"} and min(t.values()) > 0 for t in gemm_choice.CPU_GEMM.timings.values())
    assert set(gemm_choice.CPU_GEMM.choices) == keys


@pytest.mark.parametrize("compute", list(MATMUL_DTYPES))
@pytest.mark.parametrize("mode", ["fused", "dequant"])
def test_cpu_override_paths_match_reference(cpu_path, monkeypatch, fresh_choices, mode, compute):
    if not _backend.has_op("dequantize_nf4", "cpu"):
        pytest.skip(f"the CPU paths need the C++ extension: {_backend.extension_error()}")
    monkeypatch.setenv("FASTLLM_NF4_GEMM", mode)
    monkeypatch.setattr(nf4_ops, "matmul_dtype", MATMUL_DTYPES[compute])
    w = nf4.quantize(torch.randn(70, 192, generator=torch.Generator().manual_seed(9)), 64, False)
    check_forward_backward((3, 11), 70, w, torch.bfloat16, use_bias=True)
    assert gemm_choice.CPU_GEMM.choices == {}


# ---- op registry ----------------------------------------------------------------------------------------------


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("mode", ["fused", "dequant"])
def test_ops_pass_opcheck(request, monkeypatch, path, mode):
    # Schema, fake kernel, autograd registration and AOT tracing of every Python NF4 op, on small odd shapes,
    # through the Triton kernels (CUDA, or CPU under the interpreter) and through the ops' CPU bodies.
    if path == "cpu":
        request.getfixturevalue("cpu_path")
        device = "cpu"
    else:
        device = DEVICE
    monkeypatch.setenv("FASTLLM_NF4_GEMM", mode)
    for double_quant in (False, True):
        w = nf4.quantize(torch.randn(40, 128, generator=torch.Generator().manual_seed(1)), 64, double_quant)
        w = w.to(device)
        x = torch.randn(2, 9, 128, device=device, requires_grad=True)
        bias = torch.randn(40, device=device, requires_grad=True)
        grad_y = torch.randn(3, 40, device=device, requires_grad=True)
        _opcheck(torch.ops.fastllm.nf4_matmul.default, (x, *w.tensors(), bias, 64, 40))
        _opcheck(torch.ops.fastllm.nf4_matmul.default, (x[0, :2].detach(), *w.tensors(), None, 64, 40))
        _opcheck(torch.ops.fastllm.nf4_matmul_t.default, (grad_y, *w.tensors(), 64, 128))
        _opcheck(torch.ops.fastllm.nf4_dequantize.default, (*w.tensors(), 64, 40, 128, torch.bfloat16))


def test_weight_tensors_round_trip():
    w = make_weight(40, 128, 64, True, seed=2)
    fields = (w.data, w.absmax, w.nested_absmax, w.offset)
    assert all(t is u for t, u in zip(w.tensors(), fields, strict=True))
    back = NF4Weight.from_tensors(w.tensors(), w.blocksize, list(w.shape), w.dtype)
    assert all(t is u for t, u in zip(back.tensors(), fields, strict=True))
    assert (back.blocksize, back.shape, back.dtype) == (64, torch.Size((40, 128)), w.dtype)


# ---- two GPUs (device_map-style models) -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (layers on cuda:0 and cuda:1)")
@pytest.mark.parametrize("mode", ["auto", "fused", "dequant"])
def test_layers_on_two_gpus_decode_and_train(monkeypatch, mode):
    # A two-layer model split like device_map="auto": layer 0 on cuda:0, layer 1 on cuda:1, run with the *other*
    # GPU current, so a launch that ignored its tensors' device would run on the wrong GPU (illegal address or
    # garbage). Decode (M = 1) and a training step (M = 130: forward, grad_x, grad_bias) against fp64 references.
    monkeypatch.setenv("FASTLLM_NF4_GEMM", mode)
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(192, 256, generator=gen) / 16, torch.randn(320, 192, generator=gen) / 16]
    weights = [nf4.quantize(d, 64, True).to(dev) for d, dev in zip(dense, devices, strict=True)]
    biases = [
        torch.randn(d.shape[0], generator=gen).to(dev).requires_grad_() for d, dev in zip(dense, devices, strict=True)
    ]
    ref_w = [w.dequantize(torch.float32).cpu().double() for w in weights]
    for rows in (1, 130):
        x = torch.randn(rows, 256, generator=gen).to(devices[0]).to(torch.bfloat16).requires_grad_()
        with torch.cuda.device(devices[1]):
            h = nf4_matmul(x, weights[0], biases[0].to(torch.bfloat16))
        with torch.cuda.device(devices[0]):
            y = nf4_matmul(h.to(devices[1]), weights[1], biases[1].to(torch.bfloat16))
        h_ref = x.detach().cpu().double() @ ref_w[0].T + biases[0].detach().cpu().double()
        y_ref = h_ref @ ref_w[1].T + biases[1].detach().cpu().double()
        assert y.device == devices[1] and rel_err(y.cpu(), y_ref) < 3e-2
        grad = torch.randn(rows, 320, generator=gen).to(devices[1]).to(torch.bfloat16)
        with torch.cuda.device(devices[0]):
            y.backward(grad)
        grad_x_ref = (grad.cpu().double() @ ref_w[1]) @ ref_w[0]
        assert x.grad.device == devices[0] and rel_err(x.grad.cpu(), grad_x_ref) < 3e-2
        grad_b_ref = [(grad.cpu().double() @ ref_w[1]).sum(0), grad.cpu().double().sum(0)]
        for b, ref in zip(biases, grad_b_ref, strict=True):
            assert rel_err(b.grad.cpu(), ref) < 3e-2
            b.grad = None


# ---- CUDA graphs ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("mode", ["split-atomic", "split-deterministic", "direct", "gemm-fused", "gemm-dequant"])
def test_capture_and_replay_in_a_cuda_graph(monkeypatch, mode):
    # Tuned and chosen before capture (a warm-up call), then captured: no host synchronization may happen inside,
    # and a replay with new inputs gives the new product.
    fused = importlib.import_module("fastllm.kernels.nf4_fused")
    rows, n = 1, 300  # too few N tiles for two waves: split-K
    if mode == "split-deterministic":
        monkeypatch.setenv("FASTLLM_DETERMINISTIC", "1")
    if mode == "direct":
        n = 32 * fused.WAVES * fused.num_sms(torch.device("cuda")) + 5
    if mode.startswith("gemm"):
        rows = 96
        monkeypatch.setenv("FASTLLM_NF4_GEMM", mode.removeprefix("gemm-"))
    w = make_weight(n, 256, 64, True, seed=31)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    nf4_matmul(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nf4_matmul(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference.linear(x, w.dequantize(torch.float32))) < TOL[torch.bfloat16]
