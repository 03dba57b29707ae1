"""fastllm.kernels.linear_cross_entropy against F.cross_entropy(hidden @ weight.T + bias) in fp64, forward and grads.

Odd sizes: T = 37 tokens in chunks of 16 rows (``_CHUNK_ELEMENTS`` shrunk), V = 333 (not a multiple of the row pass's
128-wide interpreter blocks nor of 16), H = 48 (dense) / 128 (NF4, a multiple of the blocksize). On CPU without a GPU
the Triton row pass runs in the interpreter; the PyTorch row pass is checked on its own too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _metrics import rel_err

from fastllm import nf4
from fastllm.kernels import linear_cross_entropy
from fastllm.ops import linear_cross_entropy as ops

T, V = 37, 333
IGNORE = -100


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so T = 37 crosses three of them (the last one partial)."""
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 16 * V)


def make_inputs(device, dtype, width=48, bias=False, ignored=(3, 17, 36), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, width, generator=g) * scale).to(device, dtype)
    weight = (torch.randn(V, width, generator=g) / width**0.5).to(device, dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[list(ignored)] = IGNORE
    b = torch.randn(V, generator=g).to(device, dtype) if bias else None
    return hidden, weight, labels.to(device), b


def reference(hidden, weight, labels, bias=None, reduction="mean", label_smoothing=0.0, softcap=None, num_items=None):
    """F.cross_entropy on the materialized fp64 logits (the ground truth)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    red = "sum" if num_items is not None else reduction
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction=red, label_smoothing=label_smoothing)
    return loss / num_items if num_items is not None else loss


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def check(device, dtype, tol, *, bias=False, nf4_weight=False, ignored=(3, 17, 36), scale=1.0, **options):
    """Loss and the gradients of hidden / weight / bias against the fp64 reference (same upstream gradient)."""
    hidden, weight, labels, b = make_inputs(device, dtype, 128 if nf4_weight else 48, bias, ignored, scale)
    if nf4_weight:
        w = nf4.quantize(weight.float().cpu(), 64, True).to(device)
        weight = w.dequantize(dtype)
    h, wt, bb = leaves(hidden, weight, b)
    out = linear_cross_entropy(h, w if nf4_weight else wt, labels, bias=bb, ignore_index=IGNORE, **options)
    rh, rw, rb = leaves(hidden.double(), weight.double(), None if b is None else b.double())
    ref = reference(rh, rw, labels, rb, **options)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out, ref) < tol, f"loss rel err {rel_err(out, ref):.2e}"
    grad = torch.randn_like(ref) if ref.dim() else torch.tensor(1.7, dtype=ref.dtype, device=device)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert h.grad.dtype == dtype and rel_err(h.grad, rh.grad) < tol, f"grad_hidden rel err {rel_err(h.grad, rh.grad)}"
    if nf4_weight:
        assert wt.grad is None
    else:
        assert rel_err(wt.grad, rw.grad) < tol, f"grad_weight rel err {rel_err(wt.grad, rw.grad):.2e}"
    if bias:
        assert rel_err(bb.grad, rb.grad) < tol, f"grad_bias rel err {rel_err(bb.grad, rb.grad):.2e}"


# fp64: the row pass computes in fp64, but Triton passes the smoothing and softcap scalars as fp32 (~1e-8 relative).
EXACT = {torch.float64: 1e-7, torch.float32: 1e-5}
OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0, "scale": 4.0},
    "num_items": {"num_items": 50},
    "everything-none": {"reduction": "none", "label_smoothing": 0.2, "softcap": 2.0, "bias": True, "scale": 4.0},
    "everything-mean": {"label_smoothing": 0.2, "softcap": 2.0, "bias": True, "scale": 4.0, "num_items": 7},
}


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_cross_entropy(device, dtype, case):
    check(device, dtype, EXACT[dtype], **OPTIONS[case])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(device, reduction):
    """Every label ignored: mean is NaN (0 / 0, as F.cross_entropy), sum 0, per-token 0; all gradients zero."""
    hidden, weight, labels, _ = make_inputs(device, torch.float32, ignored=range(T))
    h, w = leaves(hidden, weight)
    out = linear_cross_entropy(h, w, labels, reduction=reduction)
    ref = reference(hidden, weight, labels, reduction=reduction)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.allclose(out.nan_to_num(), ref.float().nan_to_num())
    if reduction != "mean":
        out.sum().backward()
        assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_inputs(device, dtype):
    """fp16/bf16 hidden and weight, with bias and softcap."""
    check(device, dtype, 2e-2, bias=True, softcap=3.0, label_smoothing=0.1)


@pytest.mark.parametrize("multiply", ["fp32-in-bands", "own-dtype"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_dense_head_on_cpu(monkeypatch, dtype, multiply):
    """On a CPU without native 16-bit matmuls a 16-bit dense head multiplies in fp32, upcast a band of vocabulary
    rows at a time (here bands of 70 rows, the last one partial); with them, in its own dtype. Both match the
    reference, the head's own gradient included."""
    compute = {"fp32-in-bands": lambda d: torch.float32, "own-dtype": lambda d: d}[multiply]
    monkeypatch.setattr(ops, "matmul_dtype", compute)
    monkeypatch.setattr(ops, "_CPU_HEAD_BAND_BYTES", 70 * 48 * 4)
    bands = []
    banded = ops._banded_logits
    monkeypatch.setattr(
        ops, "_banded_logits", lambda h, w, b, dt: bands.append(len(ops._head_bands(w, dt))) or banded(h, w, b, dt)
    )
    check(torch.device("cpu"), dtype, 2e-2, bias=True, softcap=3.0, label_smoothing=0.1)
    assert bands == ([5] * 3 if multiply == "fp32-in-bands" else [])  # 3 chunks of the 37 tokens, 5 bands of 333


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_weight(device, dtype, reduction):
    """NF4 weight (double-quantized, blocksize 64) vs the reference on its dequantized values; it gets no gradient."""
    check(device, dtype, 1e-5 if dtype == torch.float32 else 2e-2, nf4_weight=True, reduction=reduction, bias=True)


def test_leading_dims_and_int32_labels(device):
    """hidden (B, S, H) with labels (B, S) of int32: same as the flattened call; "none" keeps labels' shape."""
    hidden, weight, labels, _ = make_inputs(device, torch.float32)
    hidden, labels = hidden[:36].reshape(4, 9, -1), labels[:36].reshape(4, 9)
    out = linear_cross_entropy(hidden, weight, labels.int(), reduction="none")
    assert out.shape == (4, 9)
    ref = reference(hidden.reshape(36, -1), weight, labels.reshape(36), reduction="none").reshape(4, 9)
    assert rel_err(out, ref) < 1e-5


def test_torch_row_pass_matches_triton(device):
    """The PyTorch row pass (the CPU op body) and the Triton one give the same losses and dlogits."""
    from fastllm.kernels.cross_entropy_fused import rows_triton

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(21, V, generator=g) * 5).to(device)
    labels = torch.randint(0, V, (21,), generator=g).to(device)
    labels[4] = IGNORE
    scale = torch.randn(21, generator=g).to(device)
    args = (labels, scale, IGNORE, 0.15, 4.0, True)
    loss_t, d_t = ops.rows_torch(logits.clone(), *args)
    loss_k, d_k = rows_triton(logits.clone(), *args)
    assert rel_err(loss_k, loss_t) < 1e-5 and rel_err(d_k, d_t) < 1e-5


def test_no_grad_forms_no_gradient(device, monkeypatch):
    """Under no_grad (or with nothing requiring grad) only the losses are formed: no chunk computes dlogits."""
    hidden, weight, labels, _ = make_inputs(device, torch.float32)
    seen = []
    rows = ops.chunked

    def spy(rows_fn, *args):
        seen.append(args[-3:])
        return rows(rows_fn, *args)

    monkeypatch.setattr(ops, "chunked", spy)
    with torch.no_grad():
        linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    assert seen == [(False, False, False)]


def test_logits_are_formed_in_chunks(device, monkeypatch):
    """No (T, V) logits: forward and backward form them 16 rows at a time (the chunk size set above)."""
    hidden, weight, labels, _ = make_inputs(device, torch.float32)
    shapes = []
    logits = ops._logits

    def spy(h, *args):
        shapes.append(tuple(h.shape))
        return logits(h, *args)

    monkeypatch.setattr(ops, "_logits", spy)
    linear_cross_entropy(hidden.requires_grad_(), weight, labels, reduction="none").sum().backward()
    assert max(rows for rows, _ in shapes) == 16 and sum(rows for rows, _ in shapes) == 2 * T  # forward + backward


@pytest.mark.parametrize("reduce", [True, False])
def test_opcheck(device, reduce):
    hidden, weight, labels, b = make_inputs(device, torch.float32, bias=True)
    args = (hidden.requires_grad_(), weight.requires_grad_(), None, None, None, 0, V, b.requires_grad_(), labels,
            IGNORE, 0.1, 3.0, reduce, True, True, True)  # fmt: skip
    torch.library.opcheck(ops.linear_cross_entropy_op, args)


def test_opcheck_nf4(device):
    hidden, weight, labels, _ = make_inputs(device, torch.float32, width=128)
    w = nf4.quantize(weight.cpu(), 64, True).to(device)
    args = (hidden.requires_grad_(), w.data, w.absmax, w.nested_absmax, w.offset, 64, V, None, labels, IGNORE, 0.0,
            None, False, True, False, False)  # fmt: skip
    torch.library.opcheck(ops.linear_cross_entropy_op, args)


def test_compile_traces_without_graph_breaks(device):
    hidden, weight, labels, _ = make_inputs(device, torch.float32)
    h = hidden.clone().requires_grad_()
    fn = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    out = fn(h, weight, labels, label_smoothing=0.1, softcap=3.0)
    out.backward()
    ref = reference(hidden, weight, labels, label_smoothing=0.1, softcap=3.0)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"labels": "out_of_range"}, ValueError, "labels"),
        ({"labels": "float"}, TypeError, "labels"),
        ({"labels": "short"}, ValueError, "labels"),
        ({"weight": "wrong_width"}, ValueError, "hidden"),
        ({"weight": "fp64"}, ValueError, "weight"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"num_items": 3, "reduction": "sum"}, ValueError, "num_items"),
        ({"bias": "wrong_shape"}, ValueError, "bias"),
    ],
)
def test_bad_input(device, change, error, match):
    hidden, weight, labels, _ = make_inputs(device, torch.float32)
    kwargs = {k: v for k, v in change.items() if k not in ("labels", "weight", "bias")}
    if change.get("labels") == "out_of_range":
        labels = labels.clone()
        labels[5] = V
    elif change.get("labels") == "float":
        labels = labels.float()
    elif change.get("labels") == "short":
        labels = labels[:-1]
    if change.get("weight") == "wrong_width":
        weight = weight[:, :-1]
    elif change.get("weight") == "fp64":
        weight = weight.double()
    if change.get("bias") == "wrong_shape":
        kwargs["bias"] = torch.zeros(V + 1, device=device)
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)
