"""Triton kernels of fastllm (installed as ``fastllm.kernels``)."""

from fastllm.kernels.nf4_matmul import nf4_dequantize, nf4_matmul

__all__ = ["nf4_matmul", "nf4_dequantize"]
