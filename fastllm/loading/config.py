"""``NF4Config``: the quantization config that makes ``from_pretrained`` load a model straight into NF4.

It is registered in transformers' quantizer registry under ``quant_method="fastllm_nf4"`` (see
``fastllm.integrations.quantizer``), so ``AutoModelForCausalLM.from_pretrained(path,
quantization_config=NF4Config())`` works like ``BitsAndBytesConfig(load_in_4bit=True)``.

Serialized (``to_dict``, hence a saved ``config.json``) it is a bitsandbytes 4-bit nf4 config: the
checkpoint fastllm writes is a bitsandbytes checkpoint, loadable by transformers + bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from fastllm.nf4 import FLOAT_DTYPES, check_blocksize

QUANT_METHOD = "fastllm_nf4"

# Checkpoint formats other than bitsandbytes nf4 that a config.json may announce, and what to say about them.
_UNSUPPORTED_4BIT = "bitsandbytes 4-bit fp4 (bnb_4bit_quant_type='fp4'); only nf4 shares fastllm's format"
_UNSUPPORTED_8BIT = "bitsandbytes 8-bit (LLM.int8, load_in_8bit=True); fastllm reads nf4 4-bit checkpoints only"


def _dtype(value: torch.dtype | str | None, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    else:
        dtype = None
    if value is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be torch.float32, torch.float16 or torch.bfloat16 (or its name), got {value!r}")
    return dtype


def _names(value: Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a list of module names, got {value!r}")
    return list(value)


class NF4Config(QuantizationConfigMixin):
    """Quantize every targeted linear weight to NF4 as ``from_pretrained`` reads it.

    Args:
        blocksize: NF4 block size (32 .. 4096, power of two; bitsandbytes' default 64).
        double_quant: quantize the block scales again (bitsandbytes ``bnb_4bit_use_double_quant``).
        compute_dtype: the matmul dtype of the NF4 layers (None: the input's dtype).
        skip_modules: module names or dotted path fragments left dense (default: vision towers and
            multimodal projectors, as :func:`fastllm.prepare_qlora`). The output head always stays dense.
        target_modules: "all-linear" or a list of name suffixes / a regex, as :func:`fastllm.prepare_qlora`.
        pre_quantized_format: set by :func:`fastllm.from_pretrained` for a checkpoint that already holds
            bitsandbytes nf4 weights ("bitsandbytes"); None otherwise.
        dense_modules: the linear layers left dense, recorded after loading (written to a saved
            config as bitsandbytes' ``llm_int8_skip_modules`` so bitsandbytes keeps them dense too).
    """

    def __init__(
        self,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = torch.bfloat16,
        skip_modules: Iterable[str] | None = None,
        target_modules: str | Iterable[str] = "all-linear",
        pre_quantized_format: str | None = None,
        dense_modules: Iterable[str] | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"NF4Config got unexpected arguments {sorted(kwargs)}")
        check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
        if pre_quantized_format not in (None, "bitsandbytes"):
            raise ValueError(f"pre_quantized_format must be None or 'bitsandbytes', got {pre_quantized_format!r}")
        if not isinstance(target_modules, str):
            target_modules = _names(target_modules, "target_modules")
        self.quant_method = QUANT_METHOD
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype")
        self.skip_modules = _names(skip_modules, "skip_modules")
        self.target_modules = target_modules
        self.pre_quantized_format = pre_quantized_format
        self.dense_modules = _names(dense_modules, "dense_modules")

    def to_dict(self) -> dict[str, Any]:
        """The bitsandbytes 4-bit nf4 config a checkpoint fastllm saves carries (``config.json``)."""
        compute = self.compute_dtype or torch.float32
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": sorted(self.dense_modules or []),
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }

    def to_fastllm_dict(self) -> dict[str, Any]:
        """This config's own fields (``NF4Config(**d)`` rebuilds it; used by transformers' registry)."""
        return {
            "quant_method": QUANT_METHOD,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch."),
            "skip_modules": self.skip_modules,
            "target_modules": self.target_modules,
            "pre_quantized_format": self.pre_quantized_format,
            "dense_modules": self.dense_modules,
        }

    def __iter__(self):
        yield from self.to_fastllm_dict().items()

    def __repr__(self) -> str:
        return f"NF4Config({', '.join(f'{k}={v!r}' for k, v in self.to_fastllm_dict().items() if k != 'quant_method')})"

    @classmethod
    def from_bnb(cls, bnb: dict[str, Any]) -> NF4Config:
        """The config of a pre-quantized bitsandbytes 4-bit nf4 checkpoint (its ``quantization_config`` dict).

        Raises ValueError naming the method for anything else (fp4, 8-bit, GPTQ, AWQ, ...).
        """
        check_supported(bnb)
        return cls(
            double_quant=bool(bnb.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=bnb.get("bnb_4bit_compute_dtype") or torch.float32,
            skip_modules=bnb.get("llm_int8_skip_modules"),
            pre_quantized_format="bitsandbytes",
        )


def check_supported(quantization_config: dict[str, Any]) -> None:
    """Raise ValueError naming the method unless ``quantization_config`` is bitsandbytes 4-bit nf4 (uint8 storage)."""
    method = str(quantization_config.get("quant_method", "")).lower()
    if method in ("bitsandbytes", "") and quantization_config.get("load_in_8bit"):
        raise ValueError(f"the checkpoint is quantized with {_UNSUPPORTED_8BIT}")
    if method not in ("bitsandbytes", "") or not quantization_config.get("load_in_4bit"):
        raise ValueError(
            f"the checkpoint is quantized with quant_method={quantization_config.get('quant_method')!r}; fastllm loads "
            "16/32-bit checkpoints (quantizing them to NF4) and bitsandbytes 4-bit nf4 checkpoints only"
        )
    if quantization_config.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"the checkpoint is quantized with {_UNSUPPORTED_4BIT}")
    storage = str(quantization_config.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    if storage != "uint8":
        raise ValueError(f"the checkpoint stores its bitsandbytes 4-bit weights as {storage}; only uint8 is supported")


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(NF4Config)
