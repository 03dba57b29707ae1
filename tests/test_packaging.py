"""Packaging guards: kernels/ is only ever fastllm.kernels, and the clone root imports and tests like any folder."""

import subprocess
import sys
from pathlib import Path

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
