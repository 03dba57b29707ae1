"""Triton kernels of fastllm (installed as ``fastllm.kernels``).

- ``nf4_matmul`` / ``nf4_matmul_t`` / ``nf4_dequantize``: NF4 weights dequantized in registers.
- ``attention`` / ``attention_varlen``: fused flash attention, forward and backward.
"""

from .attention import attention, attention_varlen
from .nf4_dequant import nf4_dequantize
from .nf4_matmul import nf4_matmul, nf4_matmul_t

__all__ = ["attention", "attention_varlen", "nf4_matmul", "nf4_matmul_t", "nf4_dequantize"]
