"""The PEFT ``adapter_config.json`` of a LoRA adapter: written by ``save_adapter``, checked strictly on load.

Only the fields fastllm acts on are read, and each is checked for its exact JSON type (``"false"`` is not a bool,
``true`` is not a number) and range; anything wrong raises ValueError naming the file and the key.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

# PEFT LoraConfig options that change what the weights mean and that fastllm does not implement.
_UNSUPPORTED_PATTERNS = ("rank_pattern", "alpha_pattern")


def peft_lora_config(
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    target_modules: list[str],
    fan_in_fan_out: bool,
    base_model: str | None,
) -> dict:
    """A PEFT ``LoraConfig`` as a JSON-able dict (what ``peft.PeftModel.from_pretrained`` reads)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    names = {bool: "bool", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_adapter_config(raw: bytes, file: Path) -> dict:
    """Parse and check the bytes of ``file`` (an adapter_config.json); returns the config dict.

    Checked when present: peft_type == "LORA"; r a positive integer; lora_alpha a finite number > 0;
    use_rslora, fan_in_fan_out and use_dora JSON bools (use_dora must be false); lora_dropout a number in
    [0, 1); target_modules null, a string (a regex, or "all-linear") or a list of strings; no rank_pattern or
    alpha_pattern. Raises ValueError naming ``file`` and the key.
    """
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{file}: must hold a JSON object (a PEFT LoraConfig), got a JSON {_json_type(config)}")

    def bad(key: str, expected: str) -> ValueError:
        value = config[key]
        return ValueError(f"{file}: {key} must be {expected}, got {value!r} (JSON {_json_type(value)})")

    if config.get("peft_type", "LORA") != "LORA":
        raise bad("peft_type", "'LORA' (only LoRA adapters load)")
    for key in _UNSUPPORTED_PATTERNS:
        if config.get(key):
            raise ValueError(f"{file}: per-module {key} is not supported, got {config[key]!r}")
    if "r" in config and not (isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0):
        raise bad("r", "a positive integer")
    alpha = config.get("lora_alpha")
    if "lora_alpha" in config and not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise bad("lora_alpha", "a finite number > 0")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if key in config and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    if config.get("use_dora"):
        raise bad("use_dora", "false (DoRA adapters are not supported)")
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or _is_list_of_str(targets)):
        raise bad("target_modules", "null, a string or a list of strings")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise bad("target_modules", f"a valid regular expression ({exc})") from exc
    return config


def _is_list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def target_matches(target_modules: str | list[str], module: str) -> bool:
    """Whether PEFT's ``target_modules`` selects the module path ``module`` (PEFT's rules).

    A string is a regex matched against the full path ("all-linear" selects every linear layer); a list
    holds paths or path suffixes (``"q_proj"`` selects ``layers.0.self_attn.q_proj``).
    """
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)
