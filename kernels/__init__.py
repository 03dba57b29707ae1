"""Triton kernels of fastllm (installed as ``fastllm.kernels``).

- ``nf4_matmul`` / ``nf4_matmul_t`` / ``nf4_dequantize``: NF4 weights dequantized in registers.
- ``attention`` / ``attention_varlen``: fused flash attention, forward and backward.
- ``linear_cross_entropy``: cross-entropy of ``hidden @ weight.T`` (dense or NF4) without the (T, V) logits.
"""

if __name__ != "fastllm.kernels":
    # This folder installs as fastllm.kernels. With the repository root on sys.path it is also
    # reachable as a top-level ``kernels``, a name that belongs to another PyPI package which
    # bitsandbytes tries to import; loading it twice would register every torch.library op and
    # Triton kernel a second time. Refuse, so bitsandbytes falls back as if it were absent.
    raise ImportError(f"fastllm's kernels/ folder must be imported as fastllm.kernels, not as {__name__!r}")

from .attention import attention, attention_varlen
from .cross_entropy_fused import linear_cross_entropy
from .nf4_dequant import nf4_dequantize
from .nf4_matmul import nf4_matmul, nf4_matmul_t

__all__ = ["attention", "attention_varlen", "nf4_matmul", "nf4_matmul_t", "nf4_dequantize", "linear_cross_entropy"]
