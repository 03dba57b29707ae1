"""Packaging guards: kernels/ is only ever fastllm.kernels, and the clone root imports and tests like any folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_in_repo_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # cwd = the clone root, so "" (the current directory) is on sys.path and kernels/ is findable as `kernels`.
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_top_level_kernels_answers_as_an_absent_package():
    # What the probes of the PyPI package `kernels` see from the clone root (read from their source):
    # transformers' is_kernels_available() does find_spec("kernels"), then, finding no metadata,
    # importlib.import_module("kernels") and calls it absent when the module has neither __version__ nor
    # __file__; bitsandbytes does `from kernels import get_kernel` inside `except Exception`.
    code = (
        "import importlib, importlib.util, sys\n"
        "assert importlib.util.find_spec('kernels') is not None  # found on disk before anything runs\n"
        "assert importlib.import_module('kernels') is None  # the first import: nothing executed, None\n"
        "assert sys.modules['kernels'] is None and importlib.util.find_spec('kernels') is None\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert exc.name == 'kernels', exc\n"
        "else:\n"
        "    raise SystemExit('import kernels succeeded the second time')\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('from kernels import get_kernel succeeded')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert is_kernels_available() is False\n"
        "import fastllm.kernels\n"
        "assert callable(fastllm.kernels.nf4_matmul) and fastllm.kernels.__name__ == 'fastllm.kernels'\n"
        "# the folder's modules were loaded once, under fastllm.kernels only\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.')], sorted(sys.modules)\n"
        "print('ok')\n"
    )
    done = run_in_repo_root("-c", code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


def test_transformers_models_and_bitsandbytes_import_from_the_repo_root():
    done = run_in_repo_root("-c", "import transformers.models.bert.modeling_bert, bitsandbytes; print('ok')")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


def test_python_m_pytest_collects_every_test_from_the_repo_root():
    # `python -m pytest` puts the clone root on sys.path; collecting imports every test module (transformers
    # models included), which is where a top-level `kernels` used to break.
    done = run_in_repo_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if " collected in " in line or " tests collected" in line]
    assert collected and "error" not in collected[-1], done.stdout[-3000:]


# The installed wheel, checked from outside the clone: quantize matches the reference bytes and nf4_matmul
# (the C++ GEMV for M <= 16, dequantize + matmul above) the reference within fp32 accumulation error.
SMOKE = r"""
import sys, torch, fastllm
from fastllm import reference
from fastllm.kernels import nf4_matmul
assert "site-packages" in fastllm.__file__, fastllm.__file__
assert fastllm._backend.extension_loaded(), fastllm._backend.extension_error()
torch.manual_seed(0)
w = torch.randn(72, 320)
q = fastllm.quantize(w, 64, True)
ref = reference.quantize_nf4(w, 64, True)
assert torch.equal(q.data.reshape(-1), ref.packed) and torch.equal(q.absmax, ref.absmax)
dense = reference.dequantize_nf4(ref.packed, ref.absmax, ref.nested_absmax, ref.offset, 64, (72, 320), torch.float64)
for m in (1, 5, 40):
    x = torch.randn(m, 320)
    got, want = nf4_matmul(x, q).double(), x.double() @ dense.t()
    assert ((got - want).norm() / want.norm()).item() < 1e-5, m
print("smoke ok", torch.ops.fastllm.cpu_isa())
"""


@pytest.mark.slow
def test_wheel_builds_installs_into_a_fresh_venv_and_runs(tmp_path):
    # One build of the extension (minutes): pip wheel from a clean copy of the tracked sources.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "-w", str(wheels)]
    done = subprocess.run(build, cwd=src, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = wheels.glob("fastllm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("fastllm/_C") and n.endswith(".so") for n in names), names
    assert "fastllm/kernels/__init__.py" in names and not any(n.startswith("kernels/") for n in names), names
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run(
        [str(python), "-c", SMOKE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "smoke ok" in done.stdout
