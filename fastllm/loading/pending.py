"""``PendingNF4``: the stand-in a targeted linear layer becomes while its checkpoint is read.

Before loading, every targeted ``nn.Linear`` / ``Conv1D`` of the (meta-device) model is replaced by a
``PendingNF4`` whose ``weight`` has the checkpoint's dense shape, so the loader matches the checkpoint
keys (``...q_proj.weight``, ``...q_proj.bias``) and checks shapes as for any layer. When the weight is
read, the quantizer stores its :class:`NF4Weight` here (``nf4``); :func:`finalize` then swaps every
``PendingNF4`` for the :class:`LinearNF4` it describes. A ``PendingNF4`` left without ``nf4`` means the
checkpoint lacked that weight, and :func:`finalize` refuses the model.
"""

from __future__ import annotations

import torch
from torch import nn

from fastllm.nf4 import NF4Weight
from fastllm.nn.linear_nf4 import LinearNF4
from fastllm.nn.lora import is_conv1d


class PendingNF4(nn.Module):
    """A linear layer waiting for its NF4 weight (holds no data; calling it raises).

    Attributes:
        weight: meta Parameter of the checkpoint's shape: (out, in), or (in, out) for a Conv1D.
        bias: the original layer's bias Parameter (meta until loaded) or None.
        fan_in_fan_out: the original was a transformers ``Conv1D`` (weight stored transposed).
        nf4: the quantized weight (out, in) once loaded, else None.
    """

    def __init__(self, layer: nn.Module, blocksize: int, double_quant: bool, compute_dtype: torch.dtype | None):
        super().__init__()
        self.fan_in_fan_out = is_conv1d(layer)
        stored = layer.weight
        self.weight = nn.Parameter(torch.empty(stored.shape, dtype=stored.dtype, device="meta"), requires_grad=False)
        self.bias = layer.bias
        out_features, in_features = (stored.shape[1], stored.shape[0]) if self.fan_in_fan_out else stored.shape
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        self.nf4: NF4Weight | None = None

    def dense_weight(self, stored: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight of a checkpoint tensor of this layer's stored shape."""
        return stored.t() if self.fan_in_fan_out else stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this layer's NF4 weight was never loaded (PendingNF4 left in the model)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, loaded={self.nf4 is not None}"


def replace_with_pending(
    model: nn.Module, names: list[str], blocksize: int, double_quant: bool, compute_dtype: torch.dtype | None
) -> None:
    """Swap each module of ``names`` (an ``nn.Linear`` or ``Conv1D``) for a :class:`PendingNF4`, in place."""
    for name in names:
        layer = model.get_submodule(name)
        model.set_submodule(name, PendingNF4(layer, blocksize, double_quant, compute_dtype))


def finalize(model: nn.Module) -> list[str]:
    """Swap every loaded :class:`PendingNF4` for a frozen :class:`LinearNF4` (same tensors); returns their names.

    Raises ValueError naming the layers whose weight the checkpoint did not hold (the model is then unusable).
    """
    pending = {name: m for name, m in model.named_modules() if isinstance(m, PendingNF4)}
    missing = [name for name, m in pending.items() if m.nf4 is None]
    if missing:
        raise ValueError(f"the checkpoint holds no weight for {len(missing)} quantized layer(s): {missing[:8]}")
    for name, m in pending.items():
        bias = m.bias if m.bias is not None and m.bias.device.type != "meta" else None
        if m.bias is not None and bias is None:
            raise ValueError(f"the checkpoint holds no bias for {name!r}")
        layer = LinearNF4(m.nf4, bias, m.compute_dtype)
        layer.fan_in_fan_out = m.fan_in_fan_out  # prepare_qlora gives the LoRA wrapper a Conv1D's orientation back
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
    return list(pending)
