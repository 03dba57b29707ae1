"""Packaging guards: kernels/ is only ever fastllm.kernels."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_top_level_kernels_import_is_refused_from_the_repo_root():
    # bitsandbytes tries `from kernels import get_kernel` (another PyPI package). From the repo root
    # our folder would answer and register every op twice; it must refuse with ImportError instead.
    code = (
        "import sys\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError as exc:\n"
        "    assert 'fastllm.kernels' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('top-level kernels imported: ' + kernels.__file__)\n"
        "import bitsandbytes\n"
        "import fastllm.kernels\n"
        "assert 'kernels' not in sys.modules, sys.modules.get('kernels')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")
