"""bitsandbytes ``Linear4bit`` (nf4) layers -> :class:`LinearNF4` layers holding the same bytes.

bitsandbytes and fastllm share the NF4 format, so the packed codes and the (double-quantized)
statistics move over as they are: no dequantize / re-quantize, no copy. bitsandbytes is never
imported here: a model can only hold its layers once the user has imported it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fastllm.nf4 import NF4Weight
from fastllm.nn.linear_nf4 import LinearNF4


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked without importing bitsandbytes)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def nf4_weight_from_bnb(module: nn.Module) -> NF4Weight:
    """The :class:`NF4Weight` of a quantized ``Linear4bit`` (nf4, uint8 storage), sharing its tensors.

    Raises ValueError for a layer not yet quantized (still on the meta device or never moved to a
    device), for fp4, or for a quant_storage other than uint8.
    """
    if not is_bnb_linear4bit(module):
        raise TypeError(f"module must be a bitsandbytes Linear4bit, got {type(module).__name__}")
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(module.weight, "bnb_quantized", False):
        raise ValueError("the Linear4bit layer is not quantized yet (move it to a device first)")
    if state.quant_type != "nf4":
        raise ValueError(f"only quant_type='nf4' converts to LinearNF4, this layer has {state.quant_type!r}")
    data = module.weight.data
    if data.dtype != torch.uint8:
        raise ValueError(f"only quant_storage=torch.uint8 is supported, this layer stores {data.dtype}")
    nested = state.state2.absmax if state.nested else None
    offset = state.offset if state.nested else None
    return NF4Weight(data.view(-1), state.absmax, state.blocksize, state.shape, state.dtype, nested, offset)


def linear_nf4_from_bnb(module: nn.Module, compute_dtype: torch.dtype | None = None) -> LinearNF4:
    """A :class:`LinearNF4` holding the same tensors as the bitsandbytes ``Linear4bit`` ``module``.

    ``compute_dtype`` None keeps the layer's own ``compute_dtype``.
    """
    w = nf4_weight_from_bnb(module)
    return LinearNF4(w, module.bias, compute_dtype if compute_dtype is not None else module.compute_dtype)


def convert_bnb_linear4bit(model: nn.Module) -> nn.Module:
    """Replace every nf4 ``Linear4bit`` in ``model`` by a :class:`LinearNF4` sharing its bytes, in place."""
    names = [name for name, m in model.named_modules() if is_bnb_linear4bit(m)]
    new = {name: linear_nf4_from_bnb(model.get_submodule(name)) for name in names}
    for name, module in new.items():
        model.set_submodule(name, module)
    return model
