"""Fold LoRA updates into dense weights: ``merge_and_unload`` and ``save_merged``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from fastllm._atomic import atomic_directory
from fastllm.nn.adapters import require_lora_layers
from fastllm.nn.linear_nf4 import LinearNF4
from fastllm.nn.lora import LoraLinear

# What a save of a model writes (and a new save replaces): its config and weights, sharded or not.
_SAVED_MODEL_FILE = re.compile(
    r"config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?"
)


def _merged_layer(layer: LoraLinear) -> nn.Module:
    # W' = dequant(W) + scale * B @ A in fp32, then cast once to the layer's dtype (never re-quantized).
    base = layer.base_layer
    if isinstance(base, LinearNF4):
        weight = base.dequantize(torch.float32)
        dtype = base.compute_dtype or base.weight_dtype
    else:
        weight = base.weight.float()
        dtype = base.weight.dtype
    merged = (weight + layer.delta_weight()).to(dtype)
    bias = None if base.bias is None else base.bias.detach().to(dtype)
    kwargs = {"device": merged.device, "dtype": dtype}
    if layer.fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        out = Conv1D(layer.out_features, layer.in_features).to(**kwargs)
        out.weight.copy_(merged.t())
    else:
        out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **kwargs)
        out.weight.copy_(merged)
    if out.bias is not None:
        out.bias.copy_(bias if bias is not None else torch.zeros_like(out.bias))
    return out.requires_grad_(False)  # frozen, as the base weights were (PEFT's merged layers are too)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoraLinear` by a plain dense layer holding W + scale * B @ A, in place.

    The result is an ``nn.Linear`` (a transformers ``Conv1D`` where the layer came from one) in the
    layer's compute dtype (else the original weight dtype), with requires_grad=False like the frozen base it
    replaces (as PEFT's ``merge_and_unload``). Returns ``model``.
    """
    layers = require_lora_layers(model)
    merged = {name: _merged_layer(layer) for name, layer in layers.items()}
    for name, new in merged.items():
        model.set_submodule(name, new)
    return model


def save_merged(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Merge ``model`` in place (:func:`merge_and_unload`) and save it as safetensors in ``directory``.

    A transformers model goes through ``save_pretrained`` (HF layout: config.json + model.safetensors);
    any other module is written to ``directory/model.safetensors``. The saved files replace those of an
    earlier save together (:func:`fastllm._atomic.atomic_directory`): a crash leaves the old model or the new
    one, never a mix. Other entries of ``directory`` (a tokenizer, a README) are kept. Returns the directory.
    """
    with atomic_directory(directory, keep=lambda name: _SAVED_MODEL_FILE.fullmatch(name) is None) as staging:
        merge_and_unload(model)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging)
        else:
            save_model(model, str(staging / "model.safetensors"))
    return Path(directory)
