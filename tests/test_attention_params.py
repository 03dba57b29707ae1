"""fastllm.kernels.attention options that tests/test_attention.py leaves out, against the fp64 reference, forward and
backward, on every device: one-sided windows without causal masking, windows without softcap, and key padding
combined with a window (rows that see no key included), in the padded and the packed (varlen) layouts."""

from __future__ import annotations

import pytest
import torch
from _metrics import rel_err

from fastllm import reference
from fastllm.kernels.attention import attention, attention_varlen

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
B, H, HKV, D = 3, 4, 2, 32

F16, BF16 = torch.float16, torch.bfloat16
# name: (Sq, Sk, dtype, options); "padding" becomes a key padding mask (see ``padding_mask``).
CASES = {
    "left-only-noncausal": (33, 45, F16, dict(window=(5, None))),
    "right-only-noncausal": (33, 45, BF16, dict(window=(None, 7))),
    "right-only-noncausal-sq>sk": (45, 17, F16, dict(window=(-1, 2))),  # -1: unbounded; early rows see no key
    "left-only-causal-no-softcap": (33, 33, BF16, dict(causal=True, window=(6, None))),
    "two-sided-no-softcap": (17, 45, F16, dict(window=(4, 3))),
    "padding-window-causal": (33, 33, BF16, dict(causal=True, window=(8, None), padding=True)),
    "padding-two-sided-softcap": (17, 45, F16, dict(window=(3, 5), softcap=4.0, padding=True)),
}


def padding_mask(batch: int, sk: int, device: torch.device) -> torch.Tensor:
    """Sequence 0 whole, sequence 1 left-padded by 10 keys, sequence 2 right-padded after 12 keys."""
    mask = torch.ones(batch, sk, dtype=torch.bool, device=device)
    mask[1, :10] = False
    mask[2, 12:] = False
    return mask


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert not got.isnan().any(), f"NaN in {name}"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got).cpu(), finite.cpu()), f"{name}: finite pattern differs"
    err = rel_err(got[finite], ref[finite])
    assert err < tol, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(device, case):
    sq, sk, dtype, options = CASES[case]
    options = dict(options)
    if options.pop("padding", False):
        options["key_padding_mask"] = padding_mask(B, sk, device)
    gen = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(B, heads, s, D, generator=gen).to(dtype) for heads, s in ((H, sq), (HKV, sk), (HKV, sk)))
    grad = torch.randn(B, H, sq, D, generator=gen).to(dtype)
    leaves = [t.to(device).detach().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, return_lse=True, **options)
    out.backward(grad.to(device))
    ref_leaves = [t.double().to(device).requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ref_leaves, **options)
    ref_out.backward(grad.double().to(device))
    assert out.dtype == dtype
    assert_close("out", out, ref_out, TOL[dtype])
    assert_close("lse", lse, ref_lse, TOL[dtype])
    for name, ours, theirs in zip(("dq", "dk", "dv"), leaves, ref_leaves, strict=True):
        assert_close(name, ours.grad, theirs.grad, TOL[dtype])
    empty = ~torch.isfinite(ref_lse)  # rows that see no key: exactly zero output and dq
    assert (out[empty] == 0).all() and (leaves[0].grad[empty] == 0).all()


def test_cases_cover_rows_that_see_no_key():
    """The Sq > Sk right-only window and the padded windows really have query rows with no visible key."""
    for case in ("right-only-noncausal-sq>sk", "padding-window-causal"):
        sq, sk, _, options = CASES[case]
        kpm = padding_mask(B, sk, torch.device("cpu")) if options.get("padding") else None
        visible = reference.attention_visibility(
            sq, sk, causal=options.get("causal", False), window=options["window"], key_padding_mask=kpm
        )
        assert (~visible.any(-1)).any(), case


@pytest.mark.parametrize("window", [(4, None), (None, 3), (2, 6)], ids=["left-only", "right-only", "two-sided"])
def test_varlen_windows_without_softcap(device, window):
    """Packed sequences (lengths 9, 1 and 20) with a non-causal window: each equals the reference on its own."""
    lens = [9, 1, 20]
    cu = torch.tensor([0, 9, 10, 30], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lens), heads, D, generator=gen).to(torch.float16) for heads in (H, HKV, HKV))
    grad = torch.randn(sum(lens), H, D, generator=gen).to(torch.float16)
    leaves = [t.to(device).detach().requires_grad_() for t in (q, k, v)]
    out = attention_varlen(*leaves, cu, cu, max(lens), max(lens), window=window)
    out.backward(grad.to(device))
    start = 0
    for length in lens:
        rows = slice(start, start + length)
        start += length
        ref_leaves = [t[rows].double().transpose(0, 1)[None].to(device).requires_grad_() for t in (q, k, v)]
        ref_out, _ = reference.attention(*ref_leaves, window=window)
        ref_out.backward(grad[rows].double().transpose(0, 1)[None].to(device))
        assert_close(f"out[{length}]", out[rows], ref_out[0].transpose(0, 1), TOL[torch.float16])
        for name, ours, theirs in zip(("dq", "dk", "dv"), leaves, ref_leaves, strict=True):
            assert_close(f"{name}[{length}]", ours.grad[rows], theirs.grad[0].transpose(0, 1), TOL[torch.float16])
