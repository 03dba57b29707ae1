"""One small, odd-shaped launch of every fastllm GPU kernel, for ``compute-sanitizer --tool memcheck``.

``benchmarks/gpu_check.sh`` runs this file under the sanitizer (with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so
every tensor is its own allocation and a read past its end is caught instead of landing in the caching
allocator's pool). Shapes are not multiples of any tile, blocks end short, buffers start at odd offsets: the
places where a missing mask reads or writes out of bounds. Each case also checks its result against
``fastllm.reference`` (a wrong result is a failure too). Exit status: 0 when every case ran and matched.

    python -P benchmarks/sanitizer_cases.py          # needs CUDA; FASTLLM_AUTOTUNE=0 keeps one config per kernel

New kernels: append a function to ``CASES`` (decorate it with ``@case``); it gets the CUDA device.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import torch

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter

CASES: list[Callable[[torch.device], None]] = []


def case(fn: Callable[[torch.device], None]) -> Callable[[torch.device], None]:
    """Register ``fn(device)`` as one sanitizer case."""
    CASES.append(fn)
    return fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_err(out.cpu(), ref.cpu())
    if not err < tol:
        raise AssertionError(f"{name}: rel err {err:.2e} >= {tol:.0e}")


# ---- C++/CUDA extension ops (torch.ops.fastllm.*, CUDA key) --------------------------------------------


@case
def cuda_ops_quantize_decode_dequantize(device: torch.device) -> None:
    from fastllm import _backend, reference
    from fastllm.codebook import dynamic_map

    if not _backend.has_op("quantize_nf4", device):
        raise RuntimeError(f"the extension has no CUDA kernels: {_backend.extension_error() or 'built without CUDA'}")
    ops = torch.ops.fastllm
    numel = 64 * 257 + 37  # 258 blocks (two nested blocks, the second short) and a short last block, odd count
    w = torch.randn(numel, device=device, dtype=torch.bfloat16)
    packed, absmax, nested, offset = ops.quantize_nf4(w, 64, True, dynamic_map(device))
    scales = ops.decode_scales(absmax, nested, offset, dynamic_map(device))
    for dtype in (torch.float32, torch.bfloat16):
        out = ops.dequantize_nf4(packed, scales, 64, numel, dtype)
        ref = reference.dequantize_nf4(packed.cpu(), absmax.cpu(), nested.cpu(), offset.cpu(), 64, (numel,), dtype)
        if not torch.equal(out.cpu(), ref):
            raise AssertionError(f"dequantize_nf4 {dtype} differs from the reference")


@case
def cuda_ops_gemv(device: torch.device) -> None:
    from fastllm import reference

    ops = torch.ops.fastllm
    n, k = 37, 192
    parts = reference.quantize_nf4(torch.randn(n, k), 64, False)
    dense = reference.dequantize_nf4(parts.packed, parts.absmax, None, None, 64, (n, k))
    # The packed bytes as a view at an odd byte offset of a larger buffer (the kernel must realign it).
    buffer = torch.zeros(parts.packed.numel() + 1, dtype=torch.uint8)
    buffer[1:] = parts.packed
    packed = buffer.to(device)[1:]
    for m in (1, 3, 9):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        y = ops.nf4_gemv(x, packed, parts.absmax.to(device), 64, n)
        check(f"nf4_gemv M={m}", y, reference.linear(x.cpu(), dense), 1e-2)


# ---- Triton kernels ---------------------------------------------------------------------------------


@case
def triton_nf4_matmul(device: torch.device) -> None:
    from fastllm import nf4, reference
    from fastllm.kernels import nf4_dequantize, nf4_matmul, nf4_matmul_t

    n, k = 75, 192
    w = nf4.quantize(torch.randn(n, k), 64, True).to(device)
    dense = w.dequantize(torch.float32)
    if not torch.equal(nf4_dequantize(w, torch.float16), dense.to(torch.float16)):
        raise AssertionError("nf4_dequantize differs from the reference")
    for m in (3, 37):  # split-K decode kernel, tiled GEMM
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(n, device=device, dtype=torch.bfloat16)
        y = nf4_matmul(x, w, bias)
        check(f"nf4_matmul M={m}", y, reference.linear(x.detach(), dense, bias), 2e-2)
        grad = torch.randn_like(y)
        check(f"nf4_matmul_t M={m}", nf4_matmul_t(grad, w), grad.double() @ dense.double(), 2e-2)


@case
def triton_attention(device: torch.device) -> None:
    from fastllm import reference
    from fastllm.kernels import attention, attention_varlen

    gen = torch.Generator(device=device).manual_seed(0)
    # GQA, Sq < Sk, odd lengths, every mask option at once (the padding mask leaves one sequence short).
    q = torch.randn(2, 4, 17, 64, device=device, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 45, 64, device=device, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 45, 64, device=device, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 45, dtype=torch.bool, device=device)
    mask[1, 30:] = False
    options = dict(causal=True, window=(9, None), softcap=5.0, key_padding_mask=mask)
    out = attention(q, k, v, **options)
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*leaves, **options)
    ref.backward(grad.double())
    check("attention out", out, ref, 2e-2)
    for name, ours, theirs in zip(("dq", "dk", "dv"), (q, k, v), leaves, strict=True):
        check(f"attention {name}", ours.grad, theirs.grad, 2e-2)
    # Packed sequences of lengths 5, 1 and 23; one decode row (Sq = 1).
    lens = [5, 1, 23]
    cu = torch.tensor([0, 5, 6, 29], dtype=torch.int32, device=device)
    qp, kp, vp = (torch.randn(sum(lens), 2, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = attention_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), causal=True)
    for start, length in zip((0, 5, 6), lens, strict=True):
        rows = slice(start, start + length)
        one = [t[rows].transpose(0, 1)[None] for t in (qp, kp, vp)]
        ref = reference.attention(*one, causal=True)[0][0].transpose(0, 1)
        check(f"attention_varlen length {length}", out[rows], ref, 2e-2)
    last, k, v = q[:, :, -1:].detach(), k.detach(), v.detach()
    check("attention decode", attention(last, k, v, causal=True), reference.attention(last, k, v, causal=True)[0], 2e-2)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitizer_cases: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    failed = 0
    for fn in CASES:
        try:
            fn(device)
            torch.cuda.synchronize(device)
            print(f"{fn.__name__}: ok", flush=True)
        except Exception:
            failed += 1
            print(f"{fn.__name__}: FAILED\n{traceback.format_exc()}", flush=True)
    print(f"{len(CASES) - failed} of {len(CASES)} cases ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
