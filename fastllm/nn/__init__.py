"""torch.nn modules of fastllm: the NF4 linear layer, LoRA on top of it, model preparation, adapters."""

from fastllm.nn.adapters import load_adapter, save_adapter
from fastllm.nn.linear_nf4 import LinearNF4
from fastllm.nn.lora import LoraLinear
from fastllm.nn.merge import merge_and_unload, save_merged
from fastllm.nn.prepare import prepare_qlora

__all__ = [
    "LinearNF4",
    "LoraLinear",
    "prepare_qlora",
    "save_adapter",
    "load_adapter",
    "merge_and_unload",
    "save_merged",
]
