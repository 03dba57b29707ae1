"""``fastllm.from_pretrained``: a checkpoint straight into a model with NF4 linear layers, one tensor at a time.

The model is built by transformers' own ``from_pretrained`` (device maps, key renamings, tied weights,
non-persistent buffers all behave as there) with fastllm's quantizer (``NF4Config``), fed a lazy state
dict that reads each tensor only when the loader asks for it, one at a time (see ``checkpoint.py``
for why not transformers' own whole-checkpoint mmap). Checked before anything is loaded: the index and every shard
(present, not truncated, holding what the index says) and every tensor's shape against the model the
config describes; checked on read: NaN/Inf. Any failure raises; no half-loaded model is returned.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from fastllm.integrations.quantizer import QUANTIZE_ERRORS, NF4HfQuantizer
from fastllm.loading.checkpoint import TensorEntry, checkpoint_entries, lazy_state_dict
from fastllm.loading.config import NF4Config


def _model_class(config: transformers.PretrainedConfig) -> type[PreTrainedModel]:
    # The class config.json names (architectures[0]), else a causal LM.
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM


def match_checkpoint(
    model_class: type[PreTrainedModel], config: transformers.PretrainedConfig, entries: dict[str, TensorEntry]
) -> tuple[PreTrainedModel, dict[str, str]]:
    """The model ``config`` describes, built on the meta device (no memory), and checkpoint key -> model key.

    Keys are renamed as transformers' loader renames them; keys it would not load, or would merge / split
    with a converter, are left out (transformers handles them).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    with torch.device("meta"):
        if issubclass(model_class, PreTrainedModel):
            skeleton = model_class._from_config(copy.deepcopy(config))
        else:  # an Auto class
            skeleton = model_class.from_config(copy.deepcopy(config))
    mapping = get_model_conversion_mapping(skeleton)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if not isinstance(m, WeightRenaming)]
    expected = skeleton.state_dict()
    names = {}
    for key in entries:
        name, pattern = rename_source_key(key, renamings, converters, skeleton.base_model_prefix, expected)
        if name not in expected and key in expected:
            name, pattern = key, None
        if pattern is None and name in expected:
            names[key] = name
    return skeleton, names


def check_shapes(skeleton: nn.Module, entries: dict[str, TensorEntry], names: dict[str, str]) -> None:
    """Raise ValueError naming file and tensor for a checkpoint tensor whose shape differs from the model's."""
    expected = skeleton.state_dict()
    for key, name in names.items():
        entry = entries[key]
        if tuple(expected[name].shape) != entry.shape:
            raise ValueError(
                f"{entry.file}: tensor {key!r} has shape {list(entry.shape)} but the model its config.json describes "
                f"needs {list(expected[name].shape)} for {name!r}"
            )


def from_pretrained(
    path: str | os.PathLike,
    model_class: type[nn.Module] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | dict | None = None,
    **nf4_options,
) -> PreTrainedModel:
    """Load the checkpoint directory ``path`` with its linear layers in NF4 (frozen :class:`fastllm.LinearNF4`).

    - A 16/32-bit checkpoint: each targeted weight is quantized as it is read, on the device its layer lands
      on; the 16-bit model never exists whole. Targets as :func:`fastllm.prepare_qlora` (every linear but
      the output head; vision towers / projectors dense; tied embeddings stay tied).
    - A bitsandbytes 4-bit nf4 checkpoint (``config.json`` ``quantization_config``): the stored bytes are
      loaded as they are; bitsandbytes need not be installed.

    Args:
        path: a local directory with ``config.json`` and safetensors weights (one file or an index + shards).
        model_class: the transformers class to build (default: the one ``config.json`` names).
        dtype: dtype of the layers left dense (embeddings, norms, head) and of the weights before quantizing.
        device_map: as in transformers: None (CPU), "cpu", "cuda", "auto", or a {module: device} dict.
        **nf4_options: :class:`fastllm.NF4Config` arguments (blocksize, double_quant, compute_dtype,
            skip_modules, target_modules); for a pre-quantized checkpoint only ``compute_dtype``.

    Raises:
        FileNotFoundError: no checkpoint, or a shard the index names is missing.
        ValueError: a truncated / corrupt shard, an index naming a tensor its shard lacks, a tensor whose
            shape differs from the config's model, NaN/Inf in a weight, a tensor the model needs that the
            checkpoint lacks, or a quantization method other than bitsandbytes nf4 (named).
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        stored = stored if isinstance(stored, dict) else stored.to_dict()
        unsupported = set(nf4_options) - {"compute_dtype"}
        if unsupported:
            raise ValueError(f"{sorted(unsupported)} cannot apply to a checkpoint that is already quantized")
        nf4 = NF4Config.from_bnb(stored)
        if "compute_dtype" in nf4_options:
            nf4 = NF4Config(**{**dict(nf4), "compute_dtype": nf4_options["compute_dtype"]})
        config.quantization_config = dict(nf4)  # transformers builds the quantizer from it, pre_quantized=True
        quantization_config = None
    else:
        quantization_config = NF4Config(**nf4_options)
    model_class = model_class or _model_class(config)
    entries = checkpoint_entries(path)
    to_quantize: set[str] = set()
    names: dict[str, str] = {}
    if stored is None:
        skeleton, names = match_checkpoint(model_class, config, entries)
        check_shapes(skeleton, entries, names)
        targets = {t + ".weight" for t in NF4HfQuantizer(quantization_config, pre_quantized=False).targets(skeleton)}
        to_quantize = {key for key, name in names.items() if name in targets}
    errors: list[tuple[str, str]] = []
    token = QUANTIZE_ERRORS.set(errors)
    try:
        model, info = model_class.from_pretrained(
            None,
            config=config,
            state_dict=lazy_state_dict(entries, to_quantize),
            quantization_config=quantization_config,
            dtype=dtype,
            device_map=device_map,
            output_loading_info=True,
        )
    except RuntimeError as exc:
        if not errors:
            raise
        # A quantize-op error (transformers reports it as a generic RuntimeError): name its file and tensor.
        name, message = errors[0]
        key = next((k for k, n in names.items() if n == name), name)
        where = f"{entries[key].file}: tensor {key!r}" if key in entries else f"tensor {name!r}"
        raise ValueError(f"{where} {message.removeprefix('weight ')}") from exc
    finally:
        QUANTIZE_ERRORS.reset(token)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {missing[:8]}")
    if (path / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model
