"""fastllm: QLoRA with bitsandbytes-compatible NF4 weights, fused Triton dequantize-matmul and attention."""

from fastllm.nf4 import NF4Weight, dequantize, quantize
from fastllm.nn import (
    LinearNF4,
    LoraLinear,
    load_adapter,
    merge_and_unload,
    prepare_qlora,
    save_adapter,
    save_merged,
)

__all__ = [
    "NF4Weight",
    "quantize",
    "dequantize",
    "LinearNF4",
    "LoraLinear",
    "prepare_qlora",
    "save_adapter",
    "load_adapter",
    "merge_and_unload",
    "save_merged",
]
