"""``prepare_qlora``: quantize a model's linear layers to NF4 and attach LoRA adapters, in place."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from fastllm.nf4 import FLOAT_DTYPES, check_blocksize
from fastllm.nn.bnb_convert import is_bnb_linear4bit, linear_nf4_from_bnb
from fastllm.nn.linear_nf4 import LinearNF4
from fastllm.nn.lora import LoraLinear, check_lora_args, is_conv1d

# Path components of modules left dense and frozen by default: vision towers and multimodal projectors.
DEFAULT_SKIP_MODULES: tuple[str, ...] = (
    "vision_tower",
    "vision_model",
    "visual",
    "multi_modal_projector",
    "mm_projector",
)


def _is_linear_like(module: nn.Module) -> bool:
    # What prepare_qlora can replace: nn.Linear, transformers Conv1D, bitsandbytes Linear4bit, LinearNF4.
    return isinstance(module, (nn.Linear, LinearNF4)) or is_conv1d(module) or is_bnb_linear4bit(module)


def _skipped(name: str, skip: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[i:j]) in skip for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))


def find_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    skip_modules: Iterable[str] | None = None,
) -> list[str]:
    """Names of the modules :func:`prepare_qlora` would replace (see there for the matching rules)."""
    target_modules, skip_modules = _checked_selection(target_modules, skip_modules)
    skip = set(DEFAULT_SKIP_MODULES if skip_modules is None else skip_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(target_modules, str) and target_modules != "all-linear":
        pattern = re.compile(target_modules)
        wanted = lambda name: pattern.fullmatch(name) is not None
    elif isinstance(target_modules, str):
        wanted = lambda name: True
    else:
        suffixes = target_modules
        wanted = lambda name: any(name == s or name.endswith("." + s) for s in suffixes)
    names, inside_lora = [], []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            inside_lora.append(name + "." if name else "")  # "": the model itself, everything is inside
        if any(name.startswith(p) for p in inside_lora) or not _is_linear_like(module):
            continue
        # The root (name "") cannot be replaced in place; prepare_qlora refuses a bare linear layer.
        if not name or module is head or _skipped(name, skip) or not wanted(name):
            continue
        names.append(name)
    return names


def prepare_qlora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Iterable[str] = "all-linear",
    skip_modules: Iterable[str] | None = None,
    use_rslora: bool = False,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by :class:`LoraLinear` over NF4, in place.

    Targets: ``nn.Linear``, transformers ``Conv1D`` (GPT-2), bitsandbytes ``Linear4bit`` (nf4) and
    :class:`LinearNF4` (e.g. from :func:`fastllm.from_pretrained`); the last two keep their bytes, not re-quantized.

    Args:
        target_modules: "all-linear" (every linear except ``model.get_output_embeddings()``), a list
            of name suffixes (``"q_proj"`` matches ``...self_attn.q_proj``), or a regex that must match
            the full module name (``re.fullmatch``).
        skip_modules: module names or dotted path fragments never touched (default
            ``DEFAULT_SKIP_MODULES``: vision towers and multimodal projectors stay dense).
        r, alpha, dropout, use_rslora: LoRA hyper-parameters (r > 0, alpha > 0, 0 <= dropout < 1).
        compute_dtype: matmul dtype of the quantized layers (None: the input's dtype).
        blocksize, double_quant: NF4 format (bitsandbytes' defaults: 64, True).
        progress: show a tqdm bar while quantizing.

    Returns:
        ``model``; afterwards only the LoRA A/B matrices have requires_grad=True.

    Raises ValueError for bad hyper-parameters, a model that is already prepared, target weights on the
    meta device, or when nothing matches (listing the linear layers that exist); TypeError for an argument
    of the wrong type or when ``model`` is itself a linear layer. On any error the model is left exactly as
    it was: every replacement is built before the first one is swapped in.
    """
    _check_prepare_args(model, r, alpha, dropout, use_rslora, compute_dtype, blocksize, double_quant, progress)
    target_modules, skip_modules = _checked_selection(target_modules, skip_modules)
    if _is_linear_like(model):
        raise TypeError(
            f"model is itself a linear layer ({type(model).__name__}); prepare_qlora replaces the layers inside "
            "a model in place. Use LoraLinear.from_linear for a single layer"
        )
    names = find_targets(model, target_modules, skip_modules)
    if not names:
        linears = [n for n, m in model.named_modules() if _is_linear_like(m)]
        raise ValueError(
            f"target_modules={target_modules!r} (skip_modules={skip_modules!r}) matched no module; "
            f"linear layers in the model: {linears or [n for n, _ in model.named_modules() if n]}"
        )
    _refuse_meta_weights(model, names)
    replacements = {}
    for name in tqdm(names, desc="fastllm: quantizing to NF4", unit="layer", disable=not progress):
        replacements[name] = _make_lora(
            model.get_submodule(name), r, alpha, dropout, use_rslora, compute_dtype, blocksize, double_quant
        )
    for name, new in replacements.items():
        model.set_submodule(name, new)
    for pname, param in model.named_parameters():
        param.requires_grad_(pname.endswith((".lora_A", ".lora_B")))
    return model


def _checked_selection(target_modules: object, skip_modules: object) -> tuple[str | list[str], list[str] | None]:
    # -> (target_modules as a str or a list, skip_modules as None or a list); TypeError naming a bad argument.
    if not isinstance(target_modules, str):
        if not isinstance(target_modules, Iterable):
            raise TypeError(
                f"target_modules must be 'all-linear', a regex string or a list of str, got {target_modules!r}"
            )
        target_modules = list(target_modules)
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(
                f"target_modules must be 'all-linear', a regex string or a list of str, got {target_modules!r}"
            )
    elif target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {exc}") from exc
    if skip_modules is not None:
        if isinstance(skip_modules, str) or not isinstance(skip_modules, Iterable):
            raise TypeError(f"skip_modules must be None or a list of module names (str), got {skip_modules!r}")
        skip_modules = list(skip_modules)
        if not all(isinstance(s, str) for s in skip_modules):
            raise TypeError(f"skip_modules must be None or a list of module names (str), got {skip_modules!r}")
    return target_modules, skip_modules


def _check_prepare_args(
    model: object,
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    compute_dtype: object,
    blocksize: int,
    double_quant: bool,
    progress: bool,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_lora_args(r, alpha, dropout, use_rslora)
    for name, value in (("double_quant", double_quant), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype!r}"
        )
    check_blocksize(blocksize)
    prepared = [name for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    if prepared:
        raise ValueError(
            f"model is already prepared: it holds {len(prepared)} LoraLinear layers ({', '.join(prepared[:3])}"
            f"{', ...' if len(prepared) > 3 else ''}); prepare_qlora runs once per model (merge_and_unload "
            "first to start again)"
        )


def _refuse_meta_weights(model: nn.Module, names: list[str]) -> None:
    for name in names:
        for pname, param in model.get_submodule(name).named_parameters():
            if param.is_meta:
                raise ValueError(
                    f"{name}.{pname} is on the meta device: prepare_qlora quantizes the weights' values, so load "
                    "them first (a model built under init_empty_weights / device='meta' has none)"
                )


def _make_lora(
    module: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    compute_dtype: torch.dtype | None,
    blocksize: int,
    double_quant: bool,
) -> LoraLinear:
    if is_bnb_linear4bit(module):
        base = linear_nf4_from_bnb(module, compute_dtype)
        return LoraLinear(base, r, alpha, dropout, use_rslora)
    if isinstance(module, LinearNF4):  # already NF4 (fastllm.from_pretrained): its tensors are wrapped, not requantized
        conv1d = getattr(module, "fan_in_fan_out", False)
        if compute_dtype is not None:  # a new layer over the same tensors; the model is untouched until the swap
            module = LinearNF4(module.nf4_weight(), module.bias, compute_dtype)
        return LoraLinear(module, r, alpha, dropout, use_rslora, fan_in_fan_out=conv1d)
    return LoraLinear.from_linear(module, r, alpha, dropout, use_rslora, True, blocksize, double_quant, compute_dtype)
