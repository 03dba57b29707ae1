"""fastllm benchmarks: ``python -m benchmarks [--quick]`` times fastllm against its references.

Suites live in ``suite_<name>.py`` (each returns a list of ``harness.Case``); ``runner`` times
them, ``report`` writes JSON, a markdown table and a PNG per suite. See benchmarks/README.md.
"""

import os
import sys

# `python -m benchmarks` and `pytest benchmarks/` put the repository root on sys.path, where the
# folder kernels/ would answer imports of the unrelated PyPI package "kernels" that transformers
# and bitsandbytes probe for (kernels/__init__.py refuses them). fastllm itself is installed, so
# the root is not needed: drop it before any suite imports those libraries.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
