"""fastllm.kernels.attention (Triton under TRITON_INTERPRET=1 here) against the fp64 reference, forward and backward.

The op's CPU implementation (PyTorch's fused CPU attention, the reference where it cannot) only runs without the
interpreter: ``test_cpu_implementation_matches_reference`` reruns this file's comparisons in such a process.
"""

from __future__ import annotations

import json

import pytest
import torch
from _metrics import rel_err
from _triton_compile import python_without_interpreter

from fastllm import reference
from fastllm.kernels import _config, attention_bwd, attention_decode, attention_fwd
from fastllm.kernels.attention import attention, attention_varlen
from fastllm.ops import attention as ops_attention

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_qkv(b, h, hkv, sq, sk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    return q, k, v


def make_packed_qkv(lens_q: list[int], lens_k: list[int], h: int, hkv: int, d: int, gen: torch.Generator):
    """fp32 leaves q (sum(lens_q), h, d), k and v (sum(lens_k), hkv, d) for the varlen API, drawn from ``gen``."""
    shapes = ((sum(lens_q), h, d), (sum(lens_k), hkv, d), (sum(lens_k), hkv, d))
    return tuple(torch.randn(shape, generator=gen, requires_grad=True) for shape in shapes)


def run_kernel(q, k, v, grad, device="cpu", **options):
    """(out, lse, dq, dk, dv) of ``attention`` on ``device`` for the upstream gradient ``grad``, on the CPU."""
    leaves = [t.detach().clone().to(device).requires_grad_() for t in (q, k, v)]
    kpm = options.get("key_padding_mask")
    if kpm is not None:
        options = dict(options, key_padding_mask=kpm.to(device))
    out, lse = attention(*leaves, return_lse=True, **options)
    out.backward(grad.to(device))
    return tuple(t.cpu() for t in (out, lse, *(t.grad for t in leaves)))


def run_both(q, k, v, seed=0, device="cpu", **options):
    """(out, lse, dq, dk, dv) of the kernel on ``device`` and of the fp64 reference (CPU) for the same upstream
    gradient, all on the CPU."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q.dtype)
    got = run_kernel(q, k, v, grad, device, **options)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ref_leaves, **options)
    ref_out.backward(grad.double())
    return got, (ref_out, ref_lse, *(t.grad for t in ref_leaves))


def assert_matches(case: str, got, ref, tol: float) -> None:
    """out, lse, dq, dk, dv within ``tol`` of the reference, no NaN, the same -inf lse rows (rows that see no key),
    and those rows exactly 0 in out and dq."""
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, r in zip(names, got, ref, strict=True):
        assert not g.isnan().any(), f"{case}: NaN in {name}"
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(g), finite), f"{case}: {name} finite pattern differs"
        err = rel_err(g[finite], r[finite])
        assert err < tol, f"{case}: {name} rel err {err:.2e}"
    empty = ~torch.isfinite(ref[1])
    if empty.any():
        assert (got[0][empty] == 0).all() and (got[2][empty] == 0).all()


# (B, H, Hkv, Sq, Sk, D, dtype, options): GQA/MQA, causal with Sq < Sk and Sq > Sk, padding with a fully
# padded sequence, windows, softcap, head dims 16..256, lengths 1, 17, 77, 129 -- a spread, not a product.
# A window without an explicit softcap gets softcap 3.0 (see the test); softcap=None keeps it off.
CASES = {
    "gqa-causal-sq<sk-d32-fp16": (2, 4, 2, 17, 77, 32, torch.float16, dict(causal=True)),
    "mqa-causal-sq>sk-d64-fp32": (1, 4, 1, 77, 17, 64, torch.float32, dict(causal=True)),
    "padding-full-pad-d32-fp16": (3, 2, 2, 77, 77, 32, torch.float16, dict(padding="full")),
    "padding-causal-d128-fp32": (3, 2, 1, 33, 33, 128, torch.float32, dict(causal=True, padding="left")),
    "window-softcap-causal-d64-fp16": (2, 2, 1, 129, 129, 64, torch.float16, dict(causal=True, window=(16, None))),
    "window-two-sided-softcap-d32-fp32": (1, 2, 2, 77, 129, 32, torch.float32, dict(window=(5, 9), softcap=2.0)),
    "decode-sq1-d128-fp16": (2, 4, 2, 1, 129, 128, torch.float16, dict(causal=True)),
    "single-token-d16-fp32": (1, 2, 1, 1, 1, 16, torch.float32, dict(causal=True)),
    "full-d96-fp32": (2, 2, 1, 17, 17, 96, torch.float32, dict(scale=0.3)),
    "full-d256-fp16": (1, 2, 1, 17, 40, 256, torch.float16, dict(softcap=5.0)),
    "gqa-causal-bf16": (1, 4, 2, 17, 17, 32, torch.bfloat16, dict(causal=True)),
    # Long enough for interior tiles (the unmasked stage) next to masked ones at the interpreter's 32 x 32 tiles:
    # causal diagonal + window edge + contiguous left padding (interior tiles inside the unpadded run), padding
    # with holes (no tile may skip the padding test), a two-sided window with Sq != Sk, and no mask at all.
    "interior-causal-window-padding-gqa-fp32": (
        3, 4, 2, 97, 97, 16, torch.float32, dict(causal=True, window=(45, None), padding="left")),
    "interior-causal-padding-mqa-fp16": (3, 4, 1, 71, 103, 32, torch.float16, dict(causal=True, padding="left")),
    "interior-padding-holes-fp32": (3, 2, 1, 70, 99, 16, torch.float32, dict(padding="holes")),
    "interior-two-sided-window-fp16": (1, 2, 2, 83, 101, 32, torch.float16, dict(window=(40, 33), softcap=None)),
    "interior-no-mask-sq<sk-fp32": (2, 2, 2, 70, 90, 16, torch.float32, dict(scale=0.2)),
}  # fmt: skip


def padding_mask(kind: str, batch: int, sk: int) -> torch.Tensor:
    mask = torch.ones(batch, sk, dtype=torch.bool)
    if kind == "full":  # right padding, and one sequence with no key at all
        mask[1] = False
        mask[2, sk // 2 :] = False
    elif kind == "left":  # left padding, as generation batches use
        mask[0, : sk // 3] = False
        mask[2, :5] = False
    else:  # holes: every 7th key padded, and one sequence with right padding too
        mask[:, 3::7] = False
        mask[1, sk - 9 :] = False
    return mask


def case_inputs(case: str):
    """(q, k, v, options) of ``CASES[case]`` on the CPU."""
    b, h, hkv, sq, sk, d, dtype, options = CASES[case]
    options = dict(options)
    if "softcap" not in options and "window" in options:
        options["softcap"] = 3.0
    if "padding" in options:
        options["key_padding_mask"] = padding_mask(options.pop("padding"), b, sk)
    return (*make_qkv(b, h, hkv, sq, sk, d, dtype, seed=len(case)), options)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_matches_reference(case, device):
    q, k, v, options = case_inputs(case)
    got, ref = run_both(q, k, v, device=device, **options)
    assert_matches(case, got, ref, TOL[q.dtype])


def test_empty_rows_exist_in_cases():
    """The Sq > Sk causal and fully padded cases really produce rows with no visible key."""
    for case in ("mqa-causal-sq>sk-d64-fp32", "padding-full-pad-d32-fp16"):
        b, _, _, sq, sk, _, _, options = CASES[case]
        kpm = padding_mask(options["padding"], b, sk) if "padding" in options else None
        vis = reference.attention_visibility(sq, sk, causal=options.get("causal", False), key_padding_mask=kpm)
        assert (~vis.any(-1)).any()


def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 4, 1, 45, 45, 32, torch.float32, seed=3)
    runs = [run_both(q, k, v, causal=True)[0] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_lse_and_its_gradient():
    """return_lse matches the reference logsumexp, and a loss on lse backpropagates correctly."""
    q, k, v = make_qkv(2, 2, 1, 29, 41, 64, torch.float32, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, causal=True, softcap=4.0, return_lse=True)
    (out.sum() + (lse * lse).sum()).backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ref_leaves, causal=True, softcap=4.0)
    (ref_out.sum() + (ref_lse * ref_lse).sum()).backward()
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 29)
    assert rel_err(lse, ref_lse) < 1e-6
    for g, r in zip(leaves, ref_leaves, strict=True):
        assert rel_err(g.grad, r.grad) < 1e-4


def pack(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, H, S, D) padded -> (total, H, D) packed (the first lengths[b] rows of each sequence)."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def varlen_vs_padded(q, k, v, lengths: list[int], grad: torch.Tensor, **options) -> list[float]:
    """Relative errors of out, dq, dk, dv of ``attention_varlen`` on the first ``lengths[b]`` rows of each padded
    (B, H, S, D) sequence against ``attention`` with the matching key padding mask; ``grad`` (like q) is the
    upstream gradient, zeroed on the padded query rows."""
    s = max(lengths)
    kpm = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    grad = grad * kpm[:, None, :, None]  # no gradient into padded query rows
    padded = [t.clone().requires_grad_() for t in (q, k, v)]
    padded_out = attention(*padded, key_padding_mask=kpm, **options)
    padded_out.backward(grad)
    packed = [pack(t, lengths).requires_grad_() for t in (q, k, v)]
    cu = cu_seqlens(lengths)
    out = attention_varlen(*packed, cu, cu, s, s, **options)
    out.backward(pack(grad, lengths))
    grads = [rel_err(p.grad, pack(t.grad, lengths)) for p, t in zip(packed, padded, strict=True)]
    return [rel_err(out, pack(padded_out, lengths)), *grads]


def test_varlen_matches_padded_api():
    """Packed sequences give the same outputs and gradients as the padded API with a key padding mask."""
    lengths = [17, 1, 40, 29]
    b, s = len(lengths), max(lengths)
    q, k, v = make_qkv(b, 4, 2, s, s, 32, torch.float16, seed=7)
    errors = varlen_vs_padded(
        q, k, v, lengths, torch.randn(q.shape).to(q.dtype), causal=True, window=(9, None), softcap=6.0
    )
    assert max(errors) < 1e-3, errors


def test_varlen_strided_cu_seqlens():
    """cu_seqlens given as strided views (a column of a 2-D tensor) give the same result as contiguous ones."""
    lengths = [5, 9, 3]
    q, k, v = make_packed_qkv(lengths, lengths, 2, 2, 16, torch.Generator().manual_seed(31))
    cu = cu_seqlens(lengths)
    strided = torch.stack([cu, cu * 7], dim=1)[:, 0]
    assert not strided.is_contiguous()
    expected = attention_varlen(q, k, v, cu, cu, 9, 9, causal=True)
    assert torch.equal(attention_varlen(q, k, v, strided, strided, 9, 9, causal=True), expected)


def test_varlen_unequal_lengths_matches_reference():
    """Different q and k lengths per sequence: causal is bottom-right aligned within each sequence."""
    lens_q, lens_k = [5, 17, 1], [9, 17, 30]
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_packed_qkv(lens_q, lens_k, 4, 1, 64, gen)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    for i in range(len(lens_q)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        per_seq = [
            t.detach()[s].transpose(0, 1)[None].double().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks))
        ]
        ref, _ = reference.attention(*per_seq, causal=True)
        ref.backward(grad[qs].transpose(0, 1)[None].double())
        assert rel_err(out[qs].transpose(0, 1)[None], ref) < 1e-4
        for t, s, r in ((q, qs, per_seq[0]), (k, ks, per_seq[1]), (v, ks, per_seq[2])):
            assert rel_err(t.grad[s].transpose(0, 1)[None], r.grad) < 1e-4


def test_torch_compile_fullgraph_traces():
    q, k, v = make_qkv(2, 4, 2, 19, 19, 32, torch.float32, seed=13)
    kpm = torch.ones(2, 19, dtype=torch.bool)
    kpm[1, 15:] = False
    fn = lambda a, b, c: attention(a, b, c, causal=True, key_padding_mask=kpm, softcap=5.0)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    comp_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fn(*eager_leaves).sum().backward()
    out = compiled(*comp_leaves)
    out.sum().backward()
    assert torch.equal(out, fn(q, k, v))
    for a, b in zip(comp_leaves, eager_leaves, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_strided_inputs():
    """HF layout (q a (B, S, H, D) buffer seen as (B, H, S, D)) and a k with non-unit head-dim stride: same results;
    the output keeps q's layout, which is what the fake implementation promises to torch.compile."""
    q, k, v = make_qkv(2, 4, 2, 13, 13, 16, torch.float32, seed=19)
    q_hf = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k_odd = k.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    v_leaf = v.clone().requires_grad_()
    out = attention(q_hf, k_odd, v_leaf, causal=True)
    out.backward(torch.ones_like(out))
    assert out.stride() == q_hf.stride()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*leaves, causal=True)
    ref.backward(torch.ones_like(ref))
    for g, r in zip((out, q_hf.grad, k_odd.grad, v_leaf.grad), (ref, *(t.grad for t in leaves)), strict=True):
        assert rel_err(g, r) < 1e-5


# This file's reference comparisons, rerun in a process without TRITON_INTERPRET, where CPU tensors take the op's
# CPU implementation. Calls of the fused CPU kernel are counted per case (forward, backward).
_CPU_IMPLEMENTATION_SCRIPT = """
import json
import torch
import test_attention as t
from fastllm.kernels import _config
from fastllm.ops import attention as ops

assert not _config.INTERPRET
ops._native_gqa()  # its one-time probe calls the fused kernel: before counting
calls = {"forward": 0, "backward": 0}

def counted(name, fn):
    def call(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return call

ops._flash = counted("forward", ops._flash)
ops._flash_backward = counted("backward", ops._flash_backward)
fused = {}
for case in t.CASES:
    before = dict(calls)
    t.test_forward_backward_matches_reference(case, torch.device("cpu"))
    fused[case] = [calls[name] > before[name] for name in ("forward", "backward")]
# The backward in the inputs' dtype, as CPUs with native 16-bit matmuls run it (this one upcasts: matmul_dtype).
upcast = ops.matmul_dtype
ops.matmul_dtype = lambda dtype: dtype
for case, (*_, dtype, _options) in t.CASES.items():
    if dtype != torch.float32 and not t.case_inputs(case)[3].get("softcap"):
        t.test_forward_backward_matches_reference(case, torch.device("cpu"))
ops.matmul_dtype = upcast
for test in (t.test_strided_inputs, t.test_lse_and_its_gradient, t.test_varlen_matches_padded_api,
             t.test_varlen_unequal_lengths_matches_reference, t.test_varlen_with_empty_sequences,
             t.test_torch_compile_fullgraph_traces, t.test_opcheck_forward_and_backward):
    test()
for case in t.DECODE_CASES:
    t.test_decode_with_kv_cache_matches_reference(case, torch.device("cpu"))
for window in ((2**31 - 1, 2**31 - 1), (10**30, 0)):
    t.test_huge_windows_are_unbounded(window, torch.device("cpu"))
t.test_direct_op_call_with_int32_edge_windows(torch.device("cpu"))
t.test_varlen_rows_past_max_seqlen_are_zero_under_compile(torch.device("cpu"))
print(json.dumps(fused))
"""


def test_cpu_implementation_matches_reference():
    """Without the interpreter, CPU tensors run PyTorch's fused CPU attention wherever it can express the case (no
    softcap) and the reference math otherwise: every comparison of this file holds there too, with the 16-bit
    backward upcast to fp32 or not."""
    proc = python_without_interpreter(["-c", _CPU_IMPLEMENTATION_SCRIPT])
    assert proc.returncode == 0, proc.stderr[-4000:]
    fused = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fused.keys() == CASES.keys()
    for case, used in fused.items():
        softcap = case_inputs(case)[3].get("softcap")
        assert used == [not softcap, not softcap], (case, used)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(d=8), ValueError, "head dim 8"),
        (dict(h=3), ValueError, "multiple"),
        (dict(mask_shape=(2, 7)), ValueError, "key_padding_mask: expected shape"),
        (dict(mask_dtype=torch.int64), TypeError, "key_padding_mask: expected a bool"),
        (dict(k_dtype=torch.float16), TypeError, "share one dtype"),
        (dict(q_dtype=torch.float64), TypeError, "q: dtype"),
        (dict(window=(3,)), ValueError, "window"),
        (dict(window=(-2, 0)), ValueError, "window: left"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(q_3d=True), ValueError, "q: expected a 4-D"),
    ],
)
def test_bad_input_raises(change, error, match):
    b, h, s, d = 2, change.get("h", 4), 9, change.get("d", 16)
    q = torch.randn(b, h, s, d, dtype=change.get("q_dtype", torch.float32))
    k = torch.randn(b, 2, s, d, dtype=change.get("k_dtype", torch.float32))
    v = torch.randn(b, 2, s, d, dtype=change.get("k_dtype", torch.float32))
    kpm = torch.ones(change.get("mask_shape", (b, s)), dtype=change.get("mask_dtype", torch.bool))
    if change.get("q_3d"):
        q = q[0]
    with pytest.raises(error, match=match):
        attention(q, k, v, key_padding_mask=kpm, window=change.get("window"), softcap=change.get("softcap"))


def test_bad_varlen_input_raises():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a 1-D int32"):
        attention_varlen(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k: must rise from 0 to the packed length 10"):
        attention_varlen(q, q, q, cu, torch.tensor([0, 4, 9], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q=5 is shorter"):
        attention_varlen(q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="sequence lengths must be >= 1"):
        attention(q[None, :, :0], q[None, :, :0], q[None, :, :0])


def test_varlen_with_empty_sequences():
    """A sequence with no queries, and one with queries but no keys (zeros out, zero grads), next to a normal one."""
    lens_q, lens_k = [0, 3, 7], [4, 0, 7]
    q, k, v = make_packed_qkv(lens_q, lens_k, 2, 2, 16, torch.Generator().manual_seed(23))
    out = attention_varlen(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 7, 7)
    out.sum().backward()
    assert (out[:3] == 0).all() and (q.grad[:3] == 0).all() and (k.grad[:4] == 0).all()
    ref, _ = reference.attention(*(t.detach()[None, s:].transpose(1, 2) for t, s in ((q, 3), (k, 4), (v, 4))))
    assert rel_err(out[3:], ref[0].transpose(0, 1)) < 1e-6
    assert not (q.grad.isnan().any() or k.grad.isnan().any() or v.grad.isnan().any())


TILE_TABLES = {"forward": attention_fwd.forward_tiles, "dkdv": attention_bwd.dkdv_tiles, "dq": attention_bwd.dq_tiles}


@pytest.mark.parametrize("kernel", list(TILE_TABLES))
def test_gpu_tiles_shrink_for_wide_heads_and_fp32(kernel):
    """GPU autotune candidates: wide heads keep only small tiles (q/k/v tiles of 256 columns must fit shared memory
    next to each other), fp32 ("ieee" dots, twice the bytes) only tiles at most as large, fewer than 16-bit gets."""
    tiles = TILE_TABLES[kernel]
    for dim in (16, 32, 64, 128, 256):
        for fp32 in (False, True):
            assert tiles(dim, fp32), (dim, fp32)
            assert len(set(tiles(dim, fp32))) == len(tiles(dim, fp32)), "duplicate candidates"
    area = lambda tile: tile[0] * tile[1]
    assert all(area(t) <= 64 * 64 for t in tiles(256, False))
    assert len(tiles(256, False)) < len(tiles(64, False))
    for dim in (64, 128, 256):
        assert max(map(area, tiles(dim, True))) <= min(64 * 64, max(map(area, tiles(dim, False))))
        assert len(tiles(dim, True)) < len(tiles(dim, False))


def test_dkdv_tiles_for_wide_heads_use_eight_warps():
    """The dK/dV kernel keeps four (BLOCK_N, D) tiles in registers: at D >= 128 half its candidates use 8 warps."""
    for dim in (128, 256):
        warps = [t[2] for t in attention_bwd.dkdv_tiles(dim, False)]
        assert 2 * warps.count(8) >= len(warps), (dim, warps)


def test_flat_grid_takes_any_batch_times_heads():
    """Batch x heads is folded into grid axis 0 (limit 2^31 - 1), so it may pass the 65535 limit of axes 1 and 2."""
    assert attention_fwd.flat_grid(100, 32, 70_000, "attention forward") == (4 * 70_000,)
    assert attention_fwd.flat_grid(1, 64, 2**31 - 1, "attention forward") == (2**31 - 1,)
    with pytest.raises(ValueError, match=r"attention dQ: 65536 \(batch x heads\) x 32768 row tiles .* 2\^31 - 1"):
        attention_fwd.flat_grid(2**20, 32, 2**16, "attention dQ")


def test_many_heads_and_row_tiles_map_to_the_right_programs():
    """The flat program index splits into (batch, head, row tile) correctly: 3 x 7 heads, GQA 7 -> 1, 4 row tiles."""
    q, k, v = make_qkv(3, 7, 1, 97, 50, 16, torch.float32, seed=29)
    got, ref = run_both(q, k, v, causal=True)
    for g, r in zip(got, ref, strict=True):
        finite = torch.isfinite(r)
        assert rel_err(g[finite], r[finite]) < TOL[torch.float32]


# Decoding with a KV cache: (B, H, Hkv, Sq, Sk, D, dtype, options). Sq <= 16 runs the split-KV decode kernel;
# caches long enough for several splits. Padding "cache": left padding, and one sequence whose only unpadded
# keys sit in the middle of the cache.
DECODE_CASES = {
    "sq1-gqa-causal-fp32": (2, 8, 2, 1, 300, 32, torch.float32, dict(causal=True)),
    "sq1-mqa-window-padding-fp16": (3, 4, 1, 1, 257, 64, torch.float16, dict(causal=True, window=(100, None),
                                                                           padding="cache")),
    "sq3-gqa-window-softcap-padding-fp32": (3, 6, 2, 3, 190, 16, torch.float32, dict(
        causal=True, window=(50, 0), softcap=4.0, padding="cache")),
    "sq16-gqa-causal-padding-fp16": (3, 4, 2, 16, 133, 32, torch.float16, dict(causal=True, padding="cache")),
    "sq5-no-mask-bf16": (1, 2, 2, 5, 160, 16, torch.bfloat16, dict()),
}  # fmt: skip


def decode_inputs(case: str):
    b, h, hkv, sq, sk, d, dtype, options = DECODE_CASES[case]
    options = dict(options)
    if options.pop("padding", None):
        mask = torch.ones(b, sk, dtype=torch.bool)
        mask[0, : sk // 2] = False
        mask[2, :] = False
        mask[2, sk // 3 : sk // 3 + 20] = True  # decode rows far right of them see none under a window
        options["key_padding_mask"] = mask
    return (*make_qkv(b, h, hkv, sq, sk, d, dtype, seed=len(case) + 100), options)


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_with_kv_cache_matches_reference(case, device):
    """A few query rows against a long cache (bottom-right causal), GQA / window / padding / softcap: out, lse and
    the gradients (the backward kernels run from the decode kernel's lse) equal the fp64 reference."""
    q, k, v, options = decode_inputs(case)
    got, ref = run_both(q, k, v, device=device, **options)
    assert_matches(case, got, ref, TOL[q.dtype])


def test_decode_cases_split_the_cache():
    """The decode cases really exercise the combine step: their caches are cut into several KV splits."""
    for case, (b, h, hkv, sq, sk, d, dtype, _) in DECODE_CASES.items():
        params = attention_fwd.AttentionLaunch(b, h // hkv, d, sq, sk, 1.0, 0.0, -1, -1, dtype)
        heads, _, block_n, _ = attention_decode.decode_tile(params, sq)
        programs = b * hkv * -(-(h // hkv) // heads)
        splits, split_len = attention_decode.decode_splits(programs, sk, block_n, torch.device("cpu"))
        assert splits > 1 and split_len % block_n == 0 and (splits - 1) * split_len < sk, case


@pytest.mark.parametrize("window", [(2**31 - 1, 2**31 - 1), (2**31, 0), (10**30, 10**30), (2**31 - 2, None)])
def test_huge_windows_are_unbounded(window, device):
    """Window sides at or past the int32 range (and past int64) bound nothing: the same results as no window, with
    no overflow in the kernels' index arithmetic; forward and backward, padded and packed."""
    q, k, v = make_qkv(2, 2, 1, 21, 37, 16, torch.float32, seed=41)
    unbounded = (None, 0 if window[1] == 0 else None)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(42))
    got = run_kernel(q, k, v, grad, device, window=window)
    expected = run_kernel(q, k, v, grad, device, window=unbounded)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    packed = make_packed_qkv([5, 21], [9, 37], 2, 1, 16, torch.Generator().manual_seed(43))
    cu_q, cu_k = cu_seqlens([5, 21]).to(device), cu_seqlens([9, 37]).to(device)
    leaves = [t.detach().to(device) for t in packed]
    out = attention_varlen(*leaves, cu_q, cu_k, 21, 37, window=window)
    assert torch.equal(out, attention_varlen(*leaves, cu_q, cu_k, 21, 37, window=unbounded))


def test_direct_op_call_with_int32_edge_windows(device):
    """The op itself (no front door normalising the window) with window sides of 2^31 - 1: no int32 overflow."""
    q, k, v = (t.to(device) for t in make_qkv(1, 2, 2, 19, 19, 16, torch.float32, seed=47))
    edge = 2**31 - 1
    out, lse = torch.ops.fastllm.attention_fwd(q, k, v, None, None, None, 0, 0, 0.25, edge, edge, 0.0)
    ref, ref_lse = reference.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), scale=0.25)
    assert rel_err(out.cpu(), ref) < 1e-5 and rel_err(lse.cpu(), ref_lse) < 1e-6


def test_varlen_rows_past_max_seqlen_are_zero_under_compile(device):
    """Under torch.compile the offsets cannot be checked on the host: a max_seqlen shorter than a sequence and an
    offset past the packed length read nothing out of bounds, and rows no program owns come out 0, not garbage."""
    q, k, v = (t.detach().to(device) for t in make_packed_qkv([4, 8], [4, 8], 2, 2, 16, torch.Generator()))
    fn = torch.compile(lambda q, k, v, cu: attention_varlen(q, k, v, cu, cu, 5, 5, causal=True), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    out = fn(q, k, v, cu_seqlens([4, 8]).to(device))
    assert (out[9:] == 0).all()  # the second sequence's rows past max_seqlen = 5
    for rows in (slice(0, 4), slice(4, 9)):
        expected, _ = reference.attention(*(t[rows].transpose(0, 1)[None].double().cpu() for t in (q, k, v)),
                                          causal=True)  # fmt: skip
        assert rel_err(out[rows].cpu(), expected[0].transpose(0, 1)) < 1e-5
    past_end = torch.tensor([0, 4, 40], dtype=torch.int32, device=device)  # 40 > the 12 packed rows
    out = fn(q, k, v, past_end)
    assert torch.isfinite(out).all() and (out[9:] == 0).all()


def test_opcheck_forward_and_backward():
    """torch.library.opcheck on both ops (schema, fake tensors, autograd registration, AOT dispatch), padded with
    padding mask / GQA / window / softcap and packed."""
    gen = torch.Generator().manual_seed(53)
    shapes = ((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16))
    q, k, v = (torch.randn(shape, generator=gen, requires_grad=True) for shape in shapes)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, :3] = False
    padded = (q, k, v, kpm, None, None, 0, 0, 0.25, 4, 0, 3.0)
    cu = cu_seqlens([3, 6])
    pq, pk, pv = make_packed_qkv([3, 6], [3, 6], 2, 2, 16, gen)
    packed = (pq, pk, pv, None, cu, cu, 6, 6, 0.25, -1, 0, 0.0)
    for args in (padded, packed):
        torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, args)
        out, lse = torch.ops.fastllm.attention_fwd(*args)
        tensors = [t.detach() for t in args[:3]]
        grads = (torch.randn(out.shape, generator=gen), out.detach(), lse.detach(), None)
        torch.library.opcheck(torch.ops.fastllm.attention_bwd.default, (grads[0], *tensors, *grads[1:], *args[3:]))


@pytest.mark.skipif(not _config.INTERPRET, reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
def test_interpreter_dispatches_cpu_tensors_to_the_triton_kernels(monkeypatch):
    """Under the interpreter the kernels registered for "cpu" replace the op's CPU implementation, so the tests of
    this file exercise the Triton code: the CPU implementation's paths must not be reached."""

    def refuse(*args, **kwargs):
        raise AssertionError("the op's CPU implementation ran")

    for name in ("_forward", "_backward"):
        monkeypatch.setattr(ops_attention, name, refuse)
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16, torch.float32, seed=59)
    got, ref = run_both(q, k, v, causal=True)
    assert_matches("dispatch", got, ref, TOL[torch.float32])
    got, ref = run_both(q[:, :, :1], k, v, causal=True)  # the decode kernel
    assert_matches("dispatch-decode", got, ref, TOL[torch.float32])
