"""Save an NF4 model as a bitsandbytes 4-bit checkpoint, atomically."""

from __future__ import annotations

import os

from torch import nn

from fastllm._atomic import atomic_directory
from fastllm.loading.config import NF4Config
from fastllm.nn.linear_nf4 import LinearNF4
from fastllm.nn.lora import LoraLinear
from fastllm.nn.prepare import _is_linear_like


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(path, **kwargs)`` into a staging directory swapped in whole (never a torn checkpoint).

    ``model``: a transformers model whose quantized layers are :class:`fastllm.LinearNF4` (e.g. from
    :func:`fastllm.from_pretrained`). The files are exactly a bitsandbytes 4-bit nf4 checkpoint: each
    NF4 weight as bitsandbytes' ``Linear4bit`` keys and bytes, ``config.json`` with a bitsandbytes
    ``quantization_config`` whose ``llm_int8_skip_modules`` lists the linear layers left dense.
    ``kwargs`` go to transformers' ``save_pretrained`` (``max_shard_size``, ...).
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("model holds LoRA adapters; save them with fastllm.save_adapter (or merge them first)")
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not layers:
        raise ValueError("model has no LinearNF4 layer; save a dense model with its own save_pretrained")
    if any(layer.__class__ is not LinearNF4 for layer in model.modules() if isinstance(layer, LinearNF4)):
        raise ValueError("model holds LinearNF4 subclasses; only plain LinearNF4 layers have the bitsandbytes layout")
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, NF4Config):
        first = layers[0]
        config = NF4Config(
            blocksize=first.blocksize, double_quant=first.nested_absmax is not None, compute_dtype=first.compute_dtype
        )
        model.config.quantization_config = config
    config.dense_modules = sorted(
        name for name, m in model.named_modules() if name and _is_linear_like(m) and not isinstance(m, LinearNF4)
    )
    with atomic_directory(path) as staging:
        model.save_pretrained(staging, **kwargs)
