"""CPU micro benchmarks with pytest-benchmark, outside the normal test run.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-compare`` to compare with a saved run).
Shapes are small (1024 x 1024 weights) so the whole file takes well under a minute; the suites
(``python -m benchmarks``) hold the real shapes. A provider that is not installed is skipped.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import Skip, randn
from benchmarks.suite_nf4_matmul import setup_case
from benchmarks.suite_qlora import layer_setup
from benchmarks.suite_quantize import dequantize_fn, quantize_fn

N = K = 1024
CPU = torch.device("cpu")


def _or_skip(make, *args):
    try:
        made = make(*args)
    except Skip as exc:
        pytest.skip(str(exc))
    return made[0] if isinstance(made, tuple) else made


@pytest.mark.parametrize("provider", ["fastllm", "bnb", "torchao"])
def test_quantize(benchmark, provider: str) -> None:
    benchmark.group = "quantize 1024x1024 bf16"
    w = randn((N, K), torch.bfloat16, CPU, seed=0, scale=0.02)
    out = benchmark(_or_skip(quantize_fn, provider, w))
    assert out is not None


@pytest.mark.parametrize("provider", ["fastllm", "bnb", "torchao"])
def test_dequantize(benchmark, provider: str) -> None:
    benchmark.group = "dequantize 1024x1024 bf16"
    w = randn((N, K), torch.bfloat16, CPU, seed=0, scale=0.02)
    out = benchmark(_or_skip(dequantize_fn, provider, w))
    assert out.shape == (N, K) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("provider", ["fastllm", "bnb", "torchao", "dense"])
def test_nf4_matmul(benchmark, provider: str, m: int) -> None:
    benchmark.group = f"nf4_matmul fwd M={m} 1024x1024 bf16"
    out = benchmark(_or_skip(setup_case, "fwd", provider, m, N, K, CPU))
    assert out.shape == (m, N)


@pytest.mark.parametrize("provider", ["fastllm", "peft+bnb", "peft-bf16"])
def test_lora_layer(benchmark, provider: str) -> None:
    benchmark.group = "LoRA layer fwd+bwd 128 tokens 1024x1024 r=16"
    benchmark(_or_skip(layer_setup, provider, 128, N, K, 16, CPU))
