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
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn

from fastllm._atomic import atomic_directory, read_together
from fastllm.nn.adapter_config import parse_adapter_config, peft_lora_config, target_matches
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
    The two files are replaced together (:func:`fastllm._atomic.atomic_directory`): a reader, or a crash at
    any point, sees the old pair or the new pair, never a mix. Other entries of ``directory`` are kept.
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
    peft_config = peft_lora_config(
        r=first.r,
        alpha=first.alpha,
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        target_modules=sorted(layers),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        base_model=getattr(config, "_name_or_path", None) or None,
    )
    with atomic_directory(directory, keep=lambda name: True) as staging:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return Path(directory)


def _read_adapter(path: Path) -> tuple[Path, bytes, Path, bytes | None]:
    """(weights file, its bytes, config file, its bytes or None), both files from one version of the directory."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; only safetensors adapters load (no pickle)")
        weights = path
    elif path.is_dir():
        weights = path / ADAPTER_WEIGHTS
    else:
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    config = weights.parent / ADAPTER_CONFIG
    files = read_together(weights.parent, [weights.name, ADAPTER_CONFIG])
    if files[weights.name] is None:
        pickled = sorted(p.name for p in weights.parent.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise ValueError(
                f"{path} holds {pickled} but no {ADAPTER_WEIGHTS}; pickle checkpoints are refused "
                "(convert them to safetensors with a tool you trust)"
            )
        raise FileNotFoundError(f"{path} holds no {ADAPTER_WEIGHTS}")
    return weights, files[weights.name], config, files[ADAPTER_CONFIG]


def _load_weights(raw: bytes, file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for a damaged file
        raise ValueError(f"{file}: not a readable safetensors file: {exc}") from exc


def _module_of(key: str) -> str:
    # "base_model.model.<path>.lora_A.weight" -> "<path>"
    return key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]


def _check_config_matches_weights(config: dict, config_file: Path, tensors: dict, weights: Path) -> None:
    """The config's r and target_modules must describe the weights beside it."""
    rank = config.get("r")
    for key, tensor in sorted(tensors.items()):
        if rank is not None and key.endswith(".lora_A.weight") and tensor.shape[0] != rank:
            raise ValueError(
                f"{config_file}: r={rank}, but {weights} holds {key!r} of rank {tensor.shape[0]} "
                f"(shape {tuple(tensor.shape)}); the config and the weights do not belong together"
            )
    targets = config.get("target_modules")
    if targets is None:
        return
    for key in sorted(tensors):
        module = _module_of(key)
        if not target_matches(targets, module):
            raise ValueError(
                f"{config_file}: target_modules={targets!r} does not select {module!r}, which {weights} holds "
                f"({key!r}); the config and the weights do not belong together"
            )


def _check_weights_match_model(tensors: dict, expected: dict, weights: Path) -> None:
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{weights}: unexpected key {key!r} (no LoraLinear at that path in the model)")
    for key, param in expected.items():
        if key not in tensors:
            raise ValueError(f"{weights}: missing key {key!r}")
        tensor = tensors[key]
        if tensor.shape != param.shape:
            shapes = f"has shape {tuple(tensor.shape)}, the model needs {tuple(param.shape)}"
            raise ValueError(f"{weights}: {key!r} {shapes}")
        if not tensor.is_floating_point():
            raise ValueError(f"{weights}: {key!r} must be floating point, got {tensor.dtype}")
        bad = (~torch.isfinite(tensor.to(param.dtype))).sum().item()
        if bad:
            raise ValueError(f"{weights}: {key!r} holds {bad} non-finite values (NaN/Inf) in {param.dtype}")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load LoRA weights written by :func:`save_adapter` or by PEFT into the LoraLinear layers of ``model``.

    ``path``: an adapter directory (``adapter_model.safetensors`` + optional ``adapter_config.json``)
    or a ``.safetensors`` file. lora_alpha and use_rslora from the config set each layer's scaling.
    Both files are read from one version of the directory, even while :func:`save_adapter` replaces it.

    Everything is checked before anything changes; the model is left unchanged on any error. Raises
    ValueError naming the file and the key for: a damaged or pickle file; a missing, unexpected, wrongly
    shaped or non-finite tensor; a config that is not a JSON object or holds a value of the wrong type or range
    (see :func:`fastllm.nn.adapter_config.parse_adapter_config`), or whose ``r`` or ``target_modules`` do not
    describe the weights. Returns ``model``.
    """
    layers = require_lora_layers(model)
    weights, raw_weights, config_file, raw_config = _read_adapter(Path(path))
    config = {} if raw_config is None else parse_adapter_config(raw_config, config_file)
    tensors = _load_weights(raw_weights, weights)
    expected = {}
    for name, layer in layers.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    _check_weights_match_model(tensors, expected, weights)
    _check_config_matches_weights(config, config_file, tensors, weights)
    alpha = config.get("lora_alpha")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    for layer in layers.values():
        layer.alpha = layer.alpha if alpha is None else alpha
        layer.use_rslora = config.get("use_rslora", layer.use_rslora)
    return model
