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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, Settings, nf4_nbytes, randn, rel_err, require, require_attr, torchao_nf4

DECODE_MAX_M = 16
PROVIDERS = ("fastllm", "bnb", "torchao", "dense")


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


def setup_case(op: str, provider: str, m: int, n: int, k: int, device: torch.device):
    dtype = torch.bfloat16
    weight = randn((n, k), dtype, device, seed=n + k, scale=0.02)
    x = randn((m, k), dtype, device, seed=m)
    grad_y = randn((m, n), dtype, device, seed=m + 1)
    if op == "grad_x":
        if provider == "dense":
            return lambda: grad_y @ weight
        w = require_attr("fastllm.nf4", "quantize")(weight, blocksize=64, double_quant=True)
        nf4_matmul_t = require_attr("fastllm.kernels", "nf4_matmul_t")
        err = rel_err(nf4_matmul_t(grad_y, w), grad_y.float() @ w.dequantize(torch.float32))
        return lambda: nf4_matmul_t(grad_y, w), {"rel_err": err}
    f, w = _forward(provider, weight)
    extra = {}
    if w is not None:  # fastllm: check the product against the fp32 product with its dequantized weight
        extra["rel_err"] = rel_err(f(x), x.float() @ w.dequantize(torch.float32).T)
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
            plan += [("fwd", m, PROVIDERS), ("fwd+bwd", m, PROVIDERS), ("grad_x", m, ("fastllm", "dense"))]
        for op, m, providers in plan:
            for provider in providers:
                if m <= DECODE_MAX_M:
                    weight_bytes = 2 * n * k if provider == "dense" else nf4_nbytes(n * k)
                    metric, work = "GB/s", weight_bytes + 2 * m * k + 2 * m * n
                else:
                    metric, work = "TFLOP/s", (4 if op == "fwd+bwd" else 2) * m * n * k

                def setup(op=op, provider=provider, m=m, n=n, k=k):
                    return setup_case(op, provider, m, n, k, settings.device)

                shape = {"M": m, "N": n, "K": k}
                out.append(Case("nf4_matmul", op, shape, "bfloat16", provider, metric, work, setup))
    return out
