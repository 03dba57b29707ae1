"""The CPU kernel variants (AVX-512, AVX2, scalar; csrc/nf4_cpu_isa.h) compute the same bytes.

Each variant runs in its own process (FASTLLM_CPU_ISA is read once per process): quantize, decode,
dequantize and GEMV over every dtype on odd shapes, ties and an all-zero block; the outputs must be
bit-identical to the scalar variant's, which in turn matches fastllm.reference.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _metrics import rel_err
from safetensors.torch import load_file

from fastllm import _backend, reference
from fastllm.codebook import NF4_CODE

pytestmark = pytest.mark.skipif(not _backend.extension_loaded(), reason=f"{_backend.extension_error()}")

ISAS = ("avx512", "avx2", "scalar")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
QUANT_CASES = {"a": ((37, 129), 32), "b": ((5, 301), 128), "c": ((3, 1001), 4096), "d": ((2, 200), 64)}
GEMV_CASES = {"k192": (192, 64), "k256": (256, 128)}  # K, blocksize
GEMV_ROWS = (1, 3, 5, 8, 9, 17)  # around the variants' row chunks (8 AVX-512, 3 AVX2, 4 scalar)
GEMV_N = 37  # odd, over two 16-feature tiles

# Run in a fresh process per variant; writes every output into one safetensors file.
WORKER = r"""
import sys
import torch
from safetensors.torch import save_file
from fastllm.codebook import NF4_CODE, dynamic_map
sys.path.insert(0, sys.argv[2])
from test_isa import DTYPES, GEMV_CASES, GEMV_N, GEMV_ROWS, QUANT_CASES, inputs

ops = torch.ops.fastllm
out = {}
weights, gemv_x = inputs()
for name, w in weights.items():
    blocksize = QUANT_CASES[name.split("_")[0]][1]
    for dq in (False, True):
        packed, absmax, nested, offset = ops.quantize_nf4(w, blocksize, dq, dynamic_map())
        tag = f"{name}_dq{int(dq)}"
        out.update({f"q_{tag}_packed": packed, f"q_{tag}_absmax": absmax, f"q_{tag}_nested": nested,
                    f"q_{tag}_offset": offset.reshape(-1)})
        scales = ops.decode_scales(absmax, nested, offset, dynamic_map()) if dq else absmax
        for dname, dtype in DTYPES.items():
            out[f"dq_{tag}_{dname}"] = ops.dequantize_nf4(packed, scales, blocksize, w.numel(), dtype)
for name, (x, packed, scales, blocksize) in gemv_x.items():
    out[f"gemv_{name}"] = ops.nf4_gemv(x, packed, scales, blocksize, GEMV_N)
out["isa"] = torch.tensor(list(ops.cpu_isa().encode()), dtype=torch.uint8)
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
"""


def inputs() -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Fixed-seed weights (every dtype, odd shapes, an all-zero block, values on the code midpoints) and
    GEMV operands (every x dtype, several M), the same in every process."""
    g = torch.Generator().manual_seed(1234)
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2
    weights = {}
    for case, (shape, blocksize) in QUANT_CASES.items():
        w = torch.randn(shape, generator=g).mul_(3)
        flat = w.view(-1)
        flat[: min(blocksize, flat.numel())] = 0  # an all-zero block
        if flat.numel() >= 2 * blocksize:  # a block of absmax 1 whose other values sit exactly on midpoints
            block = flat[blocksize : 2 * blocksize]
            block.zero_()
            block[0] = 1.0
            block[1 : 1 + len(mid)] = mid[: blocksize - 1]
            block[16 : 16 + len(mid)] = -mid[: blocksize - 16]
        for dname, dtype in DTYPES.items():
            weights[f"{case}_{dname}"] = w.to(dtype)
    from fastllm.codebook import dynamic_map

    gemv = {}
    for case, (k, blocksize) in GEMV_CASES.items():
        w = torch.randn(GEMV_N, k, generator=g)
        packed, absmax, nested, offset = torch.ops.fastllm.quantize_nf4(w, blocksize, True, dynamic_map())
        scales = torch.ops.fastllm.decode_scales(absmax, nested, offset, dynamic_map())
        for m in GEMV_ROWS:
            x = torch.randn(m, k, generator=g)
            for dname, dtype in DTYPES.items():
                gemv[f"{case}_m{m}_{dname}"] = (x.to(dtype), packed, scales, blocksize)
    return weights, gemv


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _expected_isas() -> set[str]:
    # What this CPU can run, from the kernel's view of CPUID (independent of the extension's own check).
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"scalar"}
    flags = _cpu_flags()
    isas = {"scalar"}
    if {"avx2", "fma", "f16c"} <= flags:
        isas.add("avx2")
        if {"avx512f", "avx512bw"} <= flags:
            isas.add("avx512")
    return isas


def _run_worker(isa: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTLLM_CPU_ISA": isa, "TRITON_INTERPRET": "0"}
    code = WORKER
    return subprocess.run(
        [sys.executable, "-c", code, str(out), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for isa in ISAS:
        out = tmp_path_factory.mktemp("isa") / f"{isa}.safetensors"
        done = _run_worker(isa, out)
        if isa in _expected_isas():
            assert done.returncode == 0, done.stderr[-3000:]
            results[isa] = load_file(out)
        else:  # forcing a variant the CPU lacks is refused with a clear error
            assert done.returncode != 0 and "ValueError" in done.stderr, done.stderr[-3000:]
            assert f"FASTLLM_CPU_ISA={isa}" in done.stderr and "cannot run" in done.stderr, done.stderr[-3000:]
    return results


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def test_each_variant_runs_what_it_says(outputs):
    assert set(outputs) == _expected_isas()
    for isa, tensors in outputs.items():
        assert bytes(tensors["isa"].tolist()).decode() == isa


def test_every_variant_is_bit_identical_to_scalar(outputs):
    if len(outputs) < 2:
        pytest.skip("this CPU runs only the scalar variant: nothing to compare")
    scalar = outputs["scalar"]
    keys = sorted(k for k in scalar if k != "isa")
    assert len(keys) > 100
    for isa, tensors in outputs.items():
        assert sorted(k for k in tensors if k != "isa") == keys
        differing = [k for k in keys if not torch.equal(_bits(tensors[k]), _bits(scalar[k]))]
        assert not differing, f"{isa} differs from scalar in {differing[:10]}"


def test_scalar_variant_matches_reference(outputs):
    got = outputs["scalar"]
    weights, gemv = inputs()
    for name, w in weights.items():
        blocksize = QUANT_CASES[name.split("_")[0]][1]
        for dq in (False, True):
            ref = reference.quantize_nf4(w, blocksize, dq)
            tag = f"{name}_dq{int(dq)}"
            assert torch.equal(got[f"q_{tag}_packed"], ref.packed), tag
            assert torch.equal(got[f"q_{tag}_absmax"], ref.absmax), tag
            if dq:
                assert torch.equal(got[f"q_{tag}_nested"], ref.nested_absmax), tag
                assert torch.equal(got[f"q_{tag}_offset"], ref.offset.reshape(-1)), tag
            for dname, dtype in DTYPES.items():
                want = reference.dequantize_nf4(
                    ref.packed, ref.absmax, ref.nested_absmax, ref.offset, blocksize, tuple(w.shape), dtype
                )
                assert torch.equal(got[f"dq_{tag}_{dname}"], want.reshape(-1)), (tag, dname)
    bound = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}
    for name, (x, packed, scales, blocksize) in gemv.items():
        w = reference.dequantize_nf4(packed, scales, None, None, blocksize, (GEMV_N, x.shape[1]), torch.float64)
        want = x.double() @ w.t()
        assert rel_err(got[f"gemv_{name}"].double(), want) < bound[name.rsplit("_", 1)[1]], name


def test_unknown_isa_name_is_a_value_error_naming_the_variable(tmp_path):
    done = _run_worker("avx9000", tmp_path / "x.safetensors")
    assert done.returncode != 0
    assert "ValueError" in done.stderr and "FASTLLM_CPU_ISA must be one of avx512, avx2, scalar" in done.stderr


@pytest.mark.parametrize("isa", ISAS)
def test_env_report_prints_the_isa_in_use(isa):
    if isa not in _expected_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    env = {**os.environ, "FASTLLM_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-m", "fastllm.env"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"CPU kernels  {isa} (forced by FASTLLM_CPU_ISA)" in done.stdout, done.stdout
