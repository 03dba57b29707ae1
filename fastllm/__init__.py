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

# Loading needs transformers: imported on first use, so `import fastllm` stays light.
_LAZY = {
    "NF4Config": "fastllm.loading",
    "from_pretrained": "fastllm.loading",
    "save_pretrained": "fastllm.loading",
    "memory_plan": "fastllm.loading.memory_plan",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastllm' has no attribute {name!r}")


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
    "NF4Config",
    "from_pretrained",
    "save_pretrained",
    "memory_plan",
]
