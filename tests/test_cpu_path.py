"""The CPU C++ path end to end: bf16 LoRA layers and tiny models with the Triton interpreter off.

In this test session the CPU runs the Triton kernels in the interpreter (tests/conftest.py turns it on when
there is no GPU). A user's CPU run takes another path, the one the README's CPU numbers come from: the C++
``fastllm::nf4_gemv`` for up to 16 rows, band-wise C++ ``fastllm::dequantize_nf4`` + torch matmul above, and the
same for grad_x. This file runs that path in one subprocess with TRITON_INTERPRET unset (this file is also the
worker script: ``python test_cpu_path.py OUT.json``), in bf16 against fp32/fp64 references:

- a LoRA layer (NF4 base), forward and the gradients of x, A and B, at 5 rows (GEMV) and 2 x 17 rows (bands),
  with and without dropout, against ``fastllm.reference.lora_linear`` in fp64 (``test_lora.bf16_layer_errors``);
- LinearNF4 alone (``test_linear_nf4.bf16_linear_errors``);
- tiny Llama / Gemma 2 / GPT-2 models: loss and the LoRA gradients against PEFT over the same model in fp32
  with the dequantized weights (``test_prepare_qlora.bf16_model_errors`` over its ``BF16_MODEL_CASES``, which
  include ``prepare_qlora(compute_dtype=bf16, use_rslora=True, blocksize=128, double_quant=False)`` on an fp32
  model);

and it checks with the torch profiler that the C++ ops ran. The same helpers run in-process on every device
(the ``device`` fixture) in their own test files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest
from test_linear_nf4 import BF16_TOL as LINEAR_BF16_TOL
from test_lora import BF16_TOL as LORA_BF16_TOL
from test_prepare_qlora import BF16_MODEL_CASES, BF16_MODEL_TOL

LAYER_CASES = [(5, 0.0), (34, 0.0), (34, 0.25)]  # (rows, dropout): the C++ GEMV, the bands, with dropout
LINEAR_ROWS = (3, 37)


def _worker(out_path: str) -> None:
    """Measure everything with the interpreter off and write the results as JSON."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    import torch
    from test_linear_nf4 import bf16_linear_errors
    from test_lora import bf16_layer_errors
    from test_prepare_qlora import bf16_model_errors

    from fastllm import _backend
    from fastllm.kernels import _config

    cpu = torch.device("cpu")
    results: dict[str, object] = {
        "interpreter": _config.INTERPRET,
        "extension": _backend.extension_error() or "loaded",
        "cpu_cpp_ops": sorted(op for op in _backend.EXTENSION_OPS if _backend.has_op(op, cpu)),
    }
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for m, dropout in LAYER_CASES:
            results[f"layer-{m}-{dropout}"] = bf16_layer_errors(cpu, m, dropout)
        for m in LINEAR_ROWS:
            results[f"linear-{m}"] = bf16_linear_errors(cpu, m)
    results["ops_run"] = sorted({e.key for e in prof.key_averages() if e.key.startswith("fastllm::")})
    for name, (arch, options) in BF16_MODEL_CASES.items():
        results[f"model-{name}"] = bf16_model_errors(arch, cpu, **options)
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def measured() -> dict:
    """The worker's results (one subprocess for the whole file)."""
    from _triton_compile import python_without_interpreter

    from fastllm import _backend

    if not _backend.extension_loaded():
        pytest.skip(f"the CPU C++ path needs fastllm._C: {_backend.extension_error()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        proc = python_without_interpreter([__file__, out], timeout=900)
        assert proc.returncode == 0, proc.stderr[-6000:]
        with open(out) as f:
            return json.load(f)


def test_path_is_the_cpp_extension(measured):
    assert measured["interpreter"] is False
    assert measured["extension"] == "loaded"
    assert measured["cpu_cpp_ops"] == sorted(["quantize_nf4", "decode_scales", "dequantize_nf4", "nf4_gemv"])
    # The GEMV for the 5-row and 3-row cases, the band-wise dequantize for the rest and for grad_x.
    assert {"fastllm::nf4_gemv", "fastllm::dequantize_nf4"} <= set(measured["ops_run"]), measured["ops_run"]


@pytest.mark.parametrize(("m", "dropout"), LAYER_CASES)
def test_bf16_lora_layer_matches_fp64_reference(measured, m, dropout):
    errors = measured[f"layer-{m}-{dropout}"]
    assert set(errors) == {"out", "grad_x", "grad_A", "grad_B"}
    for name, err in errors.items():
        assert err < LORA_BF16_TOL, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("m", LINEAR_ROWS)
def test_bf16_linear_nf4_matches_fp64_reference(measured, m):
    errors = measured[f"linear-{m}"]
    assert set(errors) == {"out", "grad_x"}
    for name, err in errors.items():
        assert err < LINEAR_BF16_TOL, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("case", list(BF16_MODEL_CASES))
def test_bf16_model_loss_and_lora_grads_match_fp32_reference(measured, case):
    errors = measured[f"model-{case}"]
    assert errors["n_grads"] == (16 if BF16_MODEL_CASES[case][0] == "gpt2" else 28)
    for name, tol in BF16_MODEL_TOL.items():
        assert errors[name] < tol, f"{name}: rel err {errors[name]:.2e}"


if __name__ == "__main__":
    _worker(sys.argv[1])
