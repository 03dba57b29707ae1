"""Save and load LoRA adapters in the PEFT format (safetensors only, never pickle).

Files in the adapter directory:
- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r, in) and
  ``.lora_B.weight`` (out, r) for every :class:`LoraLinear`;
- ``adapter_config.json``: a PEFT ``LoraConfig`` (r, lora_alpha, use_rslora, target_modules = the
  exact module paths, fan_in_fan_out for GPT-2's Conv1D) so ``peft.PeftModel.from_pretrained`` loads
  the adapter onto the unquantized base model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastllm.nn.lora import LoraLinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every :class:`LoraLinear` of ``model`` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def require_lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """:func:`lora_layers`, raising ValueError when there is none or when ``model`` is itself a LoraLinear.

    Adapter keys and in-place merging address each layer by its path inside a model; a bare layer has none.
    """
    if isinstance(model, LoraLinear):
        raise ValueError("model is itself a LoraLinear; pass the module that holds it (layers are named by path)")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model holds no LoraLinear layer (call fastllm.prepare_qlora first)")
    return layers


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the LoRA weights of ``model`` and a PEFT ``adapter_config.json`` into ``directory``.

    All LoraLinear layers must share r, alpha and use_rslora (as :func:`prepare_qlora` makes them).
    Returns the directory.
    """
    layers = require_lora_layers(model)
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.use_rslora) != (first.r, first.alpha, first.use_rslora):
            raise ValueError(
                f"{name} has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora}; save_adapter needs "
                f"the same values in every layer (first layer: {first.r}, {first.alpha}, {first.use_rslora})"
            )
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    config = getattr(model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return directory


def _weights_file(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; only safetensors adapters load (no pickle)")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    weights = path / ADAPTER_WEIGHTS
    if weights.is_file():
        return weights
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{path} holds {pickled} but no {ADAPTER_WEIGHTS}; pickle checkpoints are refused "
            "(convert them to safetensors with a tool you trust)"
        )
    raise FileNotFoundError(f"{path} holds no {ADAPTER_WEIGHTS}")


def _read_config(directory: Path) -> dict:
    file = directory / ADAPTER_CONFIG
    if not file.is_file():
        return {}
    config = json.loads(file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{file}: per-module {key} is not supported, got {config[key]!r}")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load LoRA weights written by :func:`save_adapter` or by PEFT into the LoraLinear layers of ``model``.

    ``path``: an adapter directory (``adapter_model.safetensors`` + optional ``adapter_config.json``)
    or a ``.safetensors`` file. lora_alpha and use_rslora from the config set each layer's scaling.

    Raises ValueError naming the key for a missing, unexpected or wrongly shaped tensor, and for a
    pickle checkpoint; the model is left unchanged on any error. Returns ``model``.
    """
    path = Path(path)
    weights = _weights_file(path)
    config = _read_config(weights.parent)
    layers = require_lora_layers(model)
    tensors = load_file(weights)
    expected = {}
    for name, layer in layers.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{weights}: unexpected key {key!r} (no LoraLinear at that path in the model)")
    for key, param in expected.items():
        if key not in tensors:
            raise ValueError(f"{weights}: missing key {key!r}")
        if tensors[key].shape != param.shape:
            raise ValueError(
                f"{weights}: {key!r} has shape {tuple(tensors[key].shape)}, the model needs {tuple(param.shape)}"
            )
        if not tensors[key].is_floating_point():
            raise ValueError(f"{weights}: {key!r} must be floating point, got {tensors[key].dtype}")
    alpha = config.get("lora_alpha")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"{weights.parent / ADAPTER_CONFIG}: lora_alpha must be > 0, got {alpha!r}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    for layer in layers.values():
        layer.alpha = layer.alpha if alpha is None else alpha
        layer.use_rslora = bool(config.get("use_rslora", layer.use_rslora))
    return model
