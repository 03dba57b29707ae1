"""fastllm's ``HfQuantizer``: transformers' ``from_pretrained`` builds NF4 layers as it reads the checkpoint.

Plugged in the way bitsandbytes' ``Bnb4BitHfQuantizer`` is (transformers >= 5: quantizer registry +
the weight-conversion ops of ``core_model_loading``), registered as ``quant_method="fastllm_nf4"``:

- before loading (model on the meta device): the targeted linear layers become
  :class:`~fastllm.loading.pending.PendingNF4` stand-ins (same rule as :func:`fastllm.prepare_qlora`);
- 16-bit checkpoint (``NF4Quantize``): each targeted weight, once read and placed on the device the
  ``device_map`` gives its layer, is quantized there (C++ kernel on CPU, CUDA kernel on GPU) and the
  16-bit tensor is dropped; the loader reads one tensor at a time when quantizing on the fly;
- bitsandbytes nf4 checkpoint (``NF4Deserialize``): the packed weight and its statistics are taken as
  stored, no requantization, and without importing bitsandbytes;
- after loading: every stand-in becomes a frozen :class:`~fastllm.LinearNF4`.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from fastllm.codebook import nf4_code
from fastllm.loading.config import QUANT_METHOD, NF4Config
from fastllm.loading.pending import PendingNF4, finalize, replace_with_pending
from fastllm.nf4 import BNB_QUANT_STATE_KEY, NF4Weight, quantize
from fastllm.nn.linear_nf4 import LinearNF4
from fastllm.nn.lora import is_conv1d
from fastllm.nn.prepare import DEFAULT_SKIP_MODULES, _is_linear_like, find_targets

# The keys of one bitsandbytes Linear4bit weight in a state dict (nf4: fastllm's format).
SERIALIZED_WEIGHT_KEYS = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    f"weight.{BNB_QUANT_STATE_KEY}",
]


# While set (by fastllm.from_pretrained), a list that NF4Quantize appends (parameter name, error) to before
# re-raising: transformers turns op errors into one generic RuntimeError, the caller re-raises the first one.
QUANTIZE_ERRORS: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "fastllm_quantize_errors", default=None
)


def _first(value):
    return value[0] if isinstance(value, list) else value


class NF4Quantize(ConversionOps):
    """Quantize a targeted layer's 16-bit weight (already on its layer's device) into its ``PendingNF4``."""

    def __init__(self, hf_quantizer: NF4HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: nn.Module | None = None, **kwargs) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in input_dict.items():
            value = _first(value)
            layer, _ = get_module_from_name(model, name)
            if tuple(value.shape) != tuple(layer.weight.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {list(value.shape)}, the model (from its config) "
                    f"needs {list(layer.weight.shape)}"
                )
            try:
                layer.nf4 = quantize(layer.dense_weight(value), layer.blocksize, layer.double_quant)
            except ValueError as exc:  # NaN/Inf counted by the kernel
                errors = QUANTIZE_ERRORS.get()
                if errors is not None:
                    errors.append((name, str(exc)))
                raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
            layer._is_hf_initialized = True
            out[name] = nn.Parameter(layer.nf4.data, requires_grad=False)
        return out


class NF4Deserialize(ConversionOps):
    """Rebuild a layer's :class:`NF4Weight` from its stored bitsandbytes keys (bytes as stored)."""

    def __init__(self, hf_quantizer: NF4HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs
    ) -> dict[str, torch.Tensor]:
        if len(input_dict) == 1:  # a plain `weight` (a dense layer, a norm): passes through
            return input_dict
        tensors = {key: _first(value) for key, value in input_dict.items()}
        layer, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(layer, PendingNF4):
            raise ValueError(f"{full_layer_name!r}: the checkpoint stores it in 4 bits but the model keeps it dense")
        quant_map = tensors.get("weight.quant_map")
        if quant_map is not None and not torch.equal(quant_map.float().cpu(), nf4_code()):
            raise ValueError(f"{full_layer_name!r}: weight.quant_map is not the NF4 code table (fp4?)")
        w = NF4Weight.from_bnb_state_dict(tensors, "weight")
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"{full_layer_name!r}: the checkpoint holds a {list(w.shape)} weight, the model (from its config) "
                f"needs {[layer.out_features, layer.in_features]}"
            )
        layer.nf4 = w
        layer._is_hf_initialized = True
        return {"weight": nn.Parameter(w.data, requires_grad=False)}


class NF4HfQuantizer(HfQuantizer):
    """transformers quantizer for :class:`~fastllm.NF4Config` (see the module docstring)."""

    requires_calibration = False
    quantization_config: NF4Config
    serialized_names = {"weight": SERIALIZED_WEIGHT_KEYS}

    @property
    def quantized_element_size(self) -> float:
        # Bytes per weight: 4-bit codes + one absmax per block (a byte when double-quantized, else fp32).
        config = self.quantization_config
        return 0.5 + (1 if config.double_quant else 4) / config.blocksize

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("device_map: NF4 layers cannot be offloaded to disk; use 'cpu' for what does not fit")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, PendingNF4) and name == "weight"

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the linear layers of ``model`` (meta or not, before loading) that become NF4."""
        config = self.quantization_config
        if not self.pre_quantized:
            skip = DEFAULT_SKIP_MODULES if config.skip_modules is None else config.skip_modules
            keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
            return find_targets(model, config.target_modules, [*skip, *keep_fp32])
        # A bitsandbytes checkpoint: the layers bitsandbytes quantized when it saved (its own rule).
        not_converted = self.get_modules_to_not_convert(
            model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        return [
            name
            for name, m in model.named_modules()
            if (type(m) is nn.Linear or is_conv1d(m)) and should_convert_module(name, not_converted)
        ]

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        config = self.quantization_config
        replace_with_pending(model, self.targets(model), config.blocksize, config.double_quant, config.compute_dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        finalize(model)
        self.quantization_config.dense_modules = sorted(
            name for name, m in model.named_modules() if name and _is_linear_like(m) and not isinstance(m, LinearNF4)
        )
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def get_quantize_ops(self) -> ConversionOps:
        return NF4Quantize(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": NF4Deserialize}


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(NF4HfQuantizer)
