"""pytest-benchmark micro benchmarks (``pytest benchmarks/ --benchmark-only``): time compiled code, not the
Triton interpreter, so drop TRITON_INTERPRET before fastllm or triton is imported."""

import os

os.environ.pop("TRITON_INTERPRET", None)
