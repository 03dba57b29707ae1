"""Triton kernels of fastllm (installed as ``fastllm.kernels``).

- ``nf4_matmul`` / ``nf4_matmul_t`` / ``nf4_dequantize``: NF4 weights dequantized in registers.
- ``attention`` / ``attention_varlen``: fused flash attention, forward and backward.
"""

if __name__ != "fastllm.kernels":
    # This folder installs as fastllm.kernels. With the repository root on sys.path it is also
    # reachable as a top-level ``kernels``, a name that belongs to another PyPI package which
    # bitsandbytes tries to import; loading it twice would register every torch.library op and
    # Triton kernel a second time. Refuse, so bitsandbytes falls back as if it were absent.
    raise ImportError(f"fastllm's kernels/ folder must be imported as fastllm.kernels, not as {__name__!r}")

from .attention import attention, attention_varlen
from .nf4_api import nf4_dequantize, nf4_matmul, nf4_matmul_t

__all__ = ["attention", "attention_varlen", "nf4_matmul", "nf4_matmul_t", "nf4_dequantize"]
