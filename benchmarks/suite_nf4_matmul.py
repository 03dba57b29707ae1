"""y = x @ W^T with W in NF4: fastllm vs bitsandbytes, torchao and a dense bf16 weight.

Ops:
- ``fwd``: the forward product. Decode shapes (M <= 16) report GB/s with bytes = the weight as
  stored (NF4: ``harness.nf4_nbytes``, ~4.127 bits/weight; dense: 2 * N * K) + x (2 * M * K)
  + y (2 * M * N): at small M the weight read is the whole cost. GEMM shapes report
  TFLOP/s = 2 * M * N * K / time.
- ``fwd+bwd``: forward then autograd backward to x (grad_x = grad_y @ W; W is frozen):
  4 * M * N * K FLOPs.
- ``grad_x``: the backward product alone, fastllm's ``nf4_matmul_t(grad_y, w)`` vs a dense
  grad_y @ W (bitsandbytes and torchao have no stand-alone op): 2 * M * N * K FLOPs.
- GEMM shapes of ``fwd`` and ``grad_x`` also time fastllm's two large-M paths on their own
  (providers ``fastllm-fused``: dequantize inside the GEMM; ``fastllm-dequant``: dequantize into a
  scratch buffer + cuBLAS / the CPU BLAS), and the ``fastllm`` row notes what the first-use timing
  behind its automatic choice measured (``auto``, ``fused_ms``, ``dequant_ms``).
- ``dequantize-vs-copy``: the whole weight to bf16 (the dequant path's first half) in GB/s (bytes = NF4
  weight read + 2 * N * K written) vs ``copy``, a bf16 tensor copy of the same shape (4 * N * K
  bytes): the ratio is the fraction of copy bandwidth reached.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, Settings, nf4_nbytes, randn, rel_err, require, require_attr, torchao_nf4

DECODE_MAX_M = 16
PROVIDERS = ("fastllm", "bnb", "torchao", "dense")
# fastllm's two large-M paths, each timed on its own (fastllm.ops.gemm_choice.forced).
PATHS = ("fastllm-fused", "fastllm-dequant")


def shapes(settings: Settings) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(decode Ms, GEMM Ms, weight shapes (N, K))."""
    if settings.tiny:
        return [1], [32], [(256, 320)]
    if settings.quick:
        return [1], [512], [(4096, 4096)]
    weights = [(4096, 4096), (14336, 4096), (4096, 14336)]
    if settings.cuda:
        return [1, 16], [512, 4096], weights
    return [1, 8], [512, 2048], weights


def _forward(provider: str, weight: torch.Tensor):
    """(f, extra): f(x) = x @ weight^T through ``provider``'s NF4 (or dense) form of ``weight``."""
    if provider == "fastllm":
        quantize = require_attr("fastllm.nf4", "quantize")
        nf4_matmul = require_attr("fastllm.kernels", "nf4_matmul")
        w = quantize(weight, blocksize=64, double_quant=True)
        return lambda x: nf4_matmul(x, w), w
    if provider == "bnb":
        bnb = require("bitsandbytes")
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        return lambda x: bnb.matmul_4bit(x, packed.t(), state), None
    if provider == "torchao":
        ao = torchao_nf4()
        w = ao.to_nf4(weight, 64, 256)
        return lambda x: ao.linear_nf4(x, w), None
    return lambda x: F.linear(x, weight), None


def _on_path(provider: str, fn):
    """``fn`` run on the large-M path a ``fastllm-<path>`` provider names (plain ``fn`` for ``fastllm``)."""
    if provider == "fastllm":
        return fn
    forced = require_attr("fastllm.ops.gemm_choice", "forced")
    path = provider.removeprefix("fastllm-")

    def run(*args):
        with forced(path):
            return fn(*args)

    return run


def _auto_choice(direction: str, m: int, n: int, k: int, device: torch.device) -> dict[str, object]:
    """What the first-use timing behind fastllm's automatic large-M choice measured for this shape (bf16)."""
    choice = require("fastllm.ops.gemm_choice")
    chooser = choice.GPU_GEMM if device.type == "cuda" else choice.CPU_GEMM
    key = (direction, choice.m_bucket(m), n, k, torch.bfloat16, device)
    timing = chooser.timings.get(key, {})
    return {"auto": chooser.choices.get(key, "not measured")} | {f"{p}_ms": round(ms, 4) for p, ms in timing.items()}


def setup_dequantize(provider: str, n: int, k: int, device: torch.device):
    """The bf16 dense weight from NF4 (``fastllm``) or a bf16 copy of the same shape (``copy``)."""
    weight = randn((n, k), torch.bfloat16, device, seed=n + k, scale=0.02)
    out = torch.empty_like(weight)
    if provider == "copy":
        return lambda: out.copy_(weight)
    w = require_attr("fastllm.nf4", "quantize")(weight, blocksize=64, double_quant=True)
    if device.type == "cuda":  # the Triton kernel itself, into a preallocated buffer (as the scratch path runs it)
        dequantize_into = require_attr("fastllm.kernels.nf4_dense", "dequantize_into")
        fn = lambda: dequantize_into(out, w.tensors(), w.blocksize)  # noqa: E731
    else:
        fn = lambda: w.dequantize(torch.bfloat16)  # noqa: E731
    cpu = [None if t is None else t.cpu() for t in w.tensors()]
    ref = require_attr("fastllm.reference", "dequantize_nf4")(*cpu, 64, w.shape, torch.bfloat16)
    got = fn().cpu()
    return fn, {"bit_exact": torch.equal(got, ref), "rel_err": rel_err(got, ref)}


def setup_case(op: str, provider: str, m: int, n: int, k: int, device: torch.device):
    dtype = torch.bfloat16
    if op == "dequantize-vs-copy":
        return setup_dequantize(provider, n, k, device)
    weight = randn((n, k), dtype, device, seed=n + k, scale=0.02)
    x = randn((m, k), dtype, device, seed=m)
    grad_y = randn((m, n), dtype, device, seed=m + 1)
    if op == "grad_x":
        if provider == "dense":
            return lambda: grad_y @ weight
        w = require_attr("fastllm.nf4", "quantize")(weight, blocksize=64, double_quant=True)
        nf4_matmul_t = require_attr("fastllm.kernels", "nf4_matmul_t")
        fn = _on_path(provider, lambda: nf4_matmul_t(grad_y, w))
        extra = {"rel_err": rel_err(fn(), grad_y.float() @ w.dequantize(torch.float32))}
        if provider == "fastllm":
            extra |= _auto_choice("bwd", m, n, k, device)
        return fn, extra
    fastllm = provider.startswith("fastllm")
    f, w = _forward("fastllm" if fastllm else provider, weight)
    f = _on_path(provider, f) if fastllm else f
    extra = {}
    if w is not None:  # fastllm: check the product against the fp32 product with its dequantized weight
        extra["rel_err"] = rel_err(f(x), x.float() @ w.dequantize(torch.float32).T)
        if provider == "fastllm" and m > DECODE_MAX_M:
            extra |= _auto_choice("fwd", m, n, k, device)
    if op == "fwd":
        return (lambda: f(x)), extra
    x.requires_grad_(True)

    def step():
        x.grad = None
        f(x).backward(grad_y)

    return step, extra


def cases(settings: Settings) -> list[Case]:
    decode_ms, gemm_ms, weights = shapes(settings)
    out = []
    for n, k in weights:
        plan = [("fwd", m, PROVIDERS) for m in decode_ms]
        for m in gemm_ms:
            plan += [
                ("fwd", m, PROVIDERS + PATHS),
                ("fwd+bwd", m, PROVIDERS),
                ("grad_x", m, ("fastllm", "dense") + PATHS),
            ]
        plan.append(("dequantize-vs-copy", 0, ("fastllm", "copy")))
        for op, m, providers in plan:
            for provider in providers:
                if op == "dequantize-vs-copy":
                    weight_bytes = 4 * n * k if provider == "copy" else nf4_nbytes(n * k) + 2 * n * k
                    metric, work = "GB/s", weight_bytes
                elif m <= DECODE_MAX_M:
                    weight_bytes = 2 * n * k if provider == "dense" else nf4_nbytes(n * k)
                    metric, work = "GB/s", weight_bytes + 2 * m * k + 2 * m * n
                else:
                    metric, work = "TFLOP/s", (4 if op == "fwd+bwd" else 2) * m * n * k

                def setup(op=op, provider=provider, m=m, n=n, k=k):
                    return setup_case(op, provider, m, n, k, settings.device)

                shape = {"N": n, "K": k} if op == "dequantize-vs-copy" else {"M": m, "N": n, "K": k}
                out.append(Case("nf4_matmul", op, shape, "bfloat16", provider, metric, work, setup))
    return out


def choice_report(device: torch.device) -> list[str]:
    """One line per (direction, shape): the first-use timings of fastllm's two large-M paths behind its automatic
    choice, the path chosen, and a dense bf16 matmul (cuBLAS / CPU BLAS) of the same shape timed likewise."""
    quantize = require_attr("fastllm.nf4", "quantize")
    kernels = require("fastllm.kernels")
    cuda = device.type == "cuda"
    ms = [512, 4096] if cuda else [512]
    weights = [(4096, 4096), (14336, 4096), (4096, 14336)] if cuda else [(4096, 4096)]
    lines = []
    for n, k in weights:
        weight = randn((n, k), torch.bfloat16, device, seed=n + k, scale=0.02)
        w = quantize(weight, blocksize=64, double_quant=True)
        for m in ms:
            x = randn((m, k), torch.bfloat16, device, seed=m)
            grad_y = randn((m, n), torch.bfloat16, device, seed=m + 1)
            fwd = (lambda x=x, w=w: kernels.nf4_matmul(x, w), lambda x=x, d=weight: F.linear(x, d))
            bwd = (lambda g=grad_y, w=w: kernels.nf4_matmul_t(g, w), lambda g=grad_y, d=weight: g @ d)
            for direction, (run, dense) in (("fwd", fwd), ("bwd", bwd)):
                run()  # first use: times both paths, keeps the faster
                seen = _auto_choice(direction, m, n, k, device)
                dense()
                dense_ms = _median_ms(dense, device)
                paths = ", ".join(f"{key.removesuffix('_ms')} {v:.3f} ms" for key, v in seen.items() if key != "auto")
                lines.append(
                    f"nf4 {direction} M={m} N={n} K={k} bf16 on {device}: {paths or 'no timing'} -> {seen['auto']}; "
                    f"dense bf16 matmul {dense_ms:.3f} ms"
                )
    return lines


def _median_ms(fn, device: torch.device, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    # python -m benchmarks.suite_nf4_matmul [cpu|cuda]: print the timings behind the automatic large-M choice.
    import sys

    target = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    print("\n".join(choice_report(target)))
