"""``LinearNF4``: a frozen linear layer whose weight is stored in NF4 (bitsandbytes-compatible bytes).

Storage (chosen for FSDP2, which shards every ``nn.Parameter`` along dim 0 and leaves buffers whole):

- ``weight``: uint8 Parameter (requires_grad=False) of packed codes, shape (N, K/2) when K is even so a
  dim-0 shard holds whole rows, else ((N*K + 1) // 2, 1) as bitsandbytes stores it.
- ``absmax``: Parameter (requires_grad=False) [nblocks], uint8 codes (double quant) or fp32 scales.
- ``nested_absmax`` (fp32 [ceil(nblocks / 256)]) and ``offset`` (fp32 scalar): small buffers, or None.
- ``bias``: frozen float Parameter [N] or None.

``state_dict()`` holds exactly the keys, shapes, dtypes and bytes of a bitsandbytes ``Linear4bit``
(``quant_type="nf4"``, uint8 storage) with the same weight, and ``load_state_dict`` accepts one.
Under FSDP2 (DTensor parameters) ``state_dict()`` holds dim-0 shards of those tensors (the packed
weight is gathered whole when its rows are split unevenly over the ranks), and ``load_state_dict``
takes whole tensors or shards and writes into the sharded parameters in place (collective: call both
on every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from fastllm.kernels import nf4_matmul, nf4_matmul_t
from fastllm.nf4 import BNB_QUANT_STATE_KEY, NF4Weight, quantize
from fastllm.nn._dtensor import copy_full_, flatten, full_tensor, is_dtensor
from fastllm.nn.nf4_state import QuantStateRecord, checked_bias, checked_weight

# Quantization statistics: they keep their dtype through Module.to(dtype) / .half() / .bfloat16().
_STAT_NAMES = ("absmax", "nested_absmax", "offset")


def _key_paths(keys: list[str]) -> SimpleNamespace:
    """Dotted keys as a tree of attributes: "a.b" -> namespace whose ``a`` has an attribute ``b``."""
    root = SimpleNamespace()
    for key in keys:
        node = root
        for part in key.split("."):
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
    return root


# The bitsandbytes-format keys under "weight" (see _save_to_state_dict), as attribute paths for
# torch.distributed.checkpoint (LinearNF4._fqn_modifiers).
_BNB_KEY_PATHS = _key_paths(
    [f"weight.{name}" for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", BNB_QUANT_STATE_KEY)]
)


def compute_dtype_for(x: torch.Tensor, compute_dtype: torch.dtype | None) -> tuple[torch.dtype, bool]:
    """The dtype a layer computes in for input ``x``, and whether autocast chose it.

    Under autocast for ``x``'s device the autocast dtype wins (the output stays in it, as with
    ``F.linear``); otherwise ``compute_dtype`` or, when None, ``x.dtype`` (the output is cast back
    to ``x.dtype``, as bitsandbytes does).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type), True
    return compute_dtype or x.dtype, False


def check_input(x: torch.Tensor, in_features: int) -> None:
    """TypeError unless ``x`` is a floating-point tensor, ValueError unless its shape is (..., in_features)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in_features={in_features}), got {tuple(x.shape)}")


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T + bias -> (..., N) in x.dtype (bias in x.dtype).

    The fused kernel needs K to be a multiple of the blocksize; other shapes (legal in bitsandbytes)
    fall back to dequantize + matmul.
    """
    if w.shape[1] % w.blocksize == 0:
        return nf4_matmul(x, w, bias)
    return torch.nn.functional.linear(x, w.dequantize(x.dtype), bias)


def nf4_linear_t(grad_y: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad_y (..., N) @ W -> (..., K) in grad_y.dtype (the input gradient of :func:`nf4_linear`)."""
    if w.shape[1] % w.blocksize == 0:
        return nf4_matmul_t(grad_y, w)
    return grad_y @ w.dequantize(grad_y.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class LinearNF4(nn.Module):
    """y = x @ W^T + b with W frozen in NF4; x (..., in_features) -> y (..., out_features).

    Build with :meth:`from_linear` (quantizes a dense ``nn.Linear``) or from an :class:`NF4Weight`.
    ``compute_dtype`` (None: the input's dtype) is the dtype of the matmul; autocast overrides it.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        self.compute_dtype = compute_dtype
        self._set_weight(weight)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else _frozen(bias.detach())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearNF4:
        """Quantize ``linear.weight`` (out, in; fp32/fp16/bf16) to NF4; the bias is kept as is (frozen).

        The bytes equal those of ``bnb.nn.Linear4bit(..., quant_type="nf4",
        compress_statistics=double_quant)`` holding the same weight.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls(quantize(linear.weight, blocksize, double_quant), linear.bias, compute_dtype)

    def _set_weight(self, w: NF4Weight) -> None:
        out_features, in_features = w.shape
        packed_shape = (out_features, in_features // 2) if in_features % 2 == 0 else (w.data.numel(), 1)
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.weight_dtype = w.blocksize, w.dtype
        self.weight = _frozen(w.data.reshape(packed_shape))
        self.absmax = _frozen(w.absmax)
        self.register_buffer("nested_absmax", w.nested_absmax)
        self.register_buffer("offset", w.offset)

    def nf4_weight(self) -> NF4Weight:
        """The layer's weight as an :class:`NF4Weight` (views of the stored tensors, no copy)."""
        return NF4Weight(
            self.weight.reshape(-1),
            self.absmax,
            self.blocksize,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.nested_absmax,
            self.offset,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out_features, in_features) in ``dtype`` (default: the original weight dtype)."""
        return self.nf4_weight().dequantize(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized weight (codes and statistics; bias excluded)."""
        return self.nf4_weight().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        dtype, autocast = compute_dtype_for(x, self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        y = nf4_linear(x.to(dtype), self.nf4_weight(), bias)
        return y if autocast else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- bitsandbytes-compatible state dict -------------------------------------------------------

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint (get_model_state_dict, accelerate's FSDP2 save_state) walks every state-dict
        # key as an attribute path from the model; "weight.absmax", "weight.quant_state.bitsandbytes__nf4", ... are
        # bitsandbytes' key names, not attributes of the packed weight. Its walk of "weight" goes through the
        # attribute named here instead, which has them.
        return {"weight": "_bnb_key_paths"}

    _bnb_key_paths = _BNB_KEY_PATHS

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # nf4_weight() with the packed bytes flattened by _dtensor.flatten: under FSDP2 uneven row shards
        # cannot be viewed flat and are gathered.
        w = NF4Weight(
            flatten(self.weight),
            self.absmax,
            self.blocksize,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.nested_absmax,
            self.offset,
        )
        bnb = w.to_bnb_state_dict(prefix + "weight")
        destination[prefix + "weight"] = bnb.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias
        destination.update(bnb)
        if not keep_vars:
            for key in [prefix + "weight", prefix + "bias", *bnb]:
                if key in destination:
                    destination[key] = destination[key].detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # Shards (a sharded state dict loaded into an FSDP2 model) are checked and applied whole.
        ours = {k[len(prefix) :]: full_tensor(v) for k, v in state_dict.items() if k.startswith(prefix)}
        record = f"weight.{BNB_QUANT_STATE_KEY}"
        required = ["weight", "weight.absmax", "weight.quant_map", record] + (["bias"] if self.bias is not None else [])
        missing = [k for k in required if k not in ours]
        missing_keys.extend(prefix + k for k in missing)
        known = set(required) | {"weight.nested_absmax", "weight.nested_quant_map"}
        unexpected_keys.extend(prefix + k for k in ours if k not in known)
        if missing:
            return
        # Everything is checked before the layer changes; errors name the key (ValueError / TypeError).
        whole = {prefix + k: v for k, v in ours.items()}
        assign = local_metadata.get("assign_to_params_buffers", False)
        w = checked_weight(whole, prefix, lambda record, key: self._check_record(record, key, assign))
        bias = None if self.bias is None else checked_bias(whole, prefix + "bias", self.out_features)
        if not assign and self.weight.is_meta:
            raise ValueError(
                f"{prefix}weight: this layer is on the meta device; load with load_state_dict(..., assign=True)"
            )
        if is_dtensor(self.weight):
            if assign:
                raise ValueError(
                    f"{prefix}weight: assign=True would replace the parameters FSDP2 shards (its next all-gather "
                    "would undo it); load the state dict before fully_shard, or without assign"
                )
            self._copy_into_shards(w)
        else:
            self._set_weight(w if assign else w.to(self.weight.device))
        if bias is not None:
            if assign:
                self.bias = _frozen(bias.detach())
            else:
                copy_full_(self.bias, bias)

    def _check_record(self, record: QuantStateRecord, key: str, assign: bool) -> None:
        # The weight's shape must be this layer's. Its format must be too: loading keeps the layer's format (as
        # load_state_dict keeps a parameter's dtype); assign=True adopts the state dict's format instead.
        if record.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{key}: the state dict holds a weight of shape {record.shape}, this layer needs "
                f"({self.out_features}, {self.in_features})"
            )
        ours = (self.blocksize, self.nested_absmax is not None, self.weight_dtype)
        theirs = (record.blocksize, record.double_quant, record.dtype)
        if ours != theirs and not assign:
            raise ValueError(
                f"{key}: the state dict's format (blocksize, double_quant, dtype) = {theirs} differs from this "
                f"layer's {ours}; loading would silently change the layer's format. Build the layer in the state "
                "dict's format, or pass assign=True to load_state_dict to adopt it"
            )

    def _copy_into_shards(self, w: NF4Weight) -> None:
        # FSDP2 holds the sharded parameters: replacing them would be undone by its next all-gather, so the new
        # bytes go into them in place (the format was checked equal to the layer's by _check_record).
        copy_full_(self.weight, w.data.reshape(self.weight.shape))
        copy_full_(self.absmax, w.absmax)
        for name in ("nested_absmax", "offset"):
            if getattr(self, name) is not None:
                copy_full_(getattr(self, name), getattr(w, name).reshape(getattr(self, name).shape))

    # -- keep the statistics' dtype under Module.to(dtype) -----------------------------------------

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LinearNF4:
        # Module.to(dtype) / .half() cast every floating tensor. The fp32 block statistics are part of
        # the format's bytes, so they only follow device moves; the bias is cast like any parameter.
        stats = {name: getattr(self, name) for name in _STAT_NAMES}
        for name in _STAT_NAMES:
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        super()._apply(fn, recurse)
        for name, t in stats.items():
            if t is not None:
                moved = fn(t)
                t = moved if moved.dtype == t.dtype else t.to(moved.device)
            if name == "absmax":
                self.absmax = t if isinstance(t, nn.Parameter) else _frozen(t)
            else:
                self.register_buffer(name, t)
        return self
