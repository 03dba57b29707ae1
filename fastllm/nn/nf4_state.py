"""Strict checks of a bitsandbytes ``Linear4bit`` state dict before :class:`LinearNF4` loads it.

Every tensor (type, dtype, size, device, finiteness of the statistics, the two code tables) and every field of the
quant-state JSON record (type and value: ``quant_type``, ``blocksize``, ``dtype``, ``shape``, ``nested_blocksize``,
``nested_dtype``, ``nested_offset``) is checked before the layer changes, so a bad state dict raises a ValueError
(or TypeError for a non-tensor) naming the key instead of loading NaN scales or a mis-shaped weight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastllm.codebook import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_map, nf4_code
from fastllm.nf4 import BNB_QUANT_STATE_KEY, FLOAT_DTYPES, NF4Weight

_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
_PLAIN_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


@dataclass(frozen=True)
class QuantStateRecord:
    """The checked fields of a bitsandbytes nf4 quant-state record."""

    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nested_offset: float | None  # None: no double quantization

    @property
    def double_quant(self) -> bool:
        return self.nested_offset is not None

    @property
    def nblocks(self) -> int:
        return -(-math.prod(self.shape) // self.blocksize)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    names = {bool: "bool", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _tensor(state: dict, key: str) -> torch.Tensor:
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key}: expected a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{key}: is on the meta device (it holds no values to load)")
    return value


def parse_record(tensor: torch.Tensor, key: str) -> QuantStateRecord:
    """Decode and check the uint8 bytes of a quant-state record; raises ValueError naming ``key`` and the field."""
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{key}: expected uint8 bytes of a JSON record, got dtype {tensor.dtype}")
    try:
        record = json.loads(bytes(tensor.detach().reshape(-1).cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key}: not a JSON quant-state record: {exc}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{key}: the quant-state record must be a JSON object, got a JSON {_json_type(record)}")

    def bad(field: str, expected: str) -> ValueError:
        value = record[field]
        return ValueError(f"{key}: field {field!r} must be {expected}, got {value!r} (JSON {_json_type(value)})")

    unknown = sorted(set(record) - set(_PLAIN_FIELDS) - set(_NESTED_FIELDS))
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {unknown} in the quant-state record")
    missing = [f for f in _PLAIN_FIELDS if f not in record]
    if missing:
        raise ValueError(f"{key}: the quant-state record lacks {missing}")
    nested = [f for f in _NESTED_FIELDS if f in record]
    if nested and len(nested) != len(_NESTED_FIELDS):
        raise ValueError(f"{key}: the record has {nested} but not all of {list(_NESTED_FIELDS)} (double quantization)")
    if record["quant_type"] != "nf4":
        raise bad("quant_type", "'nf4' (only NF4 is supported)")
    if not (_is_int(record["blocksize"]) and record["blocksize"] in ALLOWED_BLOCKSIZES):
        raise bad("blocksize", f"one of {ALLOWED_BLOCKSIZES}")
    if not (isinstance(record["dtype"], str) and record["dtype"] in _DTYPES_BY_NAME):
        raise bad("dtype", f"one of {sorted(_DTYPES_BY_NAME)}")
    shape = record["shape"]
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
        raise bad("shape", "a non-empty list of positive integers")
    offset = None
    if nested:
        if not (_is_int(record["nested_blocksize"]) and record["nested_blocksize"] == NESTED_BLOCKSIZE):
            raise bad("nested_blocksize", f"{NESTED_BLOCKSIZE}")
        if record["nested_dtype"] != "float32":
            raise bad("nested_dtype", "'float32'")
        offset = record["nested_offset"]
        if not (isinstance(offset, (int, float)) and not isinstance(offset, bool) and math.isfinite(offset)):
            raise bad("nested_offset", "a finite number")
        if offset < 0:
            raise bad("nested_offset", ">= 0 (the mean of the non-negative block absmax values)")
    return QuantStateRecord(record["blocksize"], _DTYPES_BY_NAME[record["dtype"]], tuple(shape), offset)


def _check_tensor(t: torch.Tensor, key: str, dtype: torch.dtype, numel: int, statistic: bool = False) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{key}: must have dtype {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{key}: must hold {numel} elements, got shape {tuple(t.shape)}")
    if statistic:
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise ValueError(f"{key}: holds {bad} non-finite values (NaN/Inf); every output would be NaN")
        negative = (t < 0).sum().item()
        if negative:
            raise ValueError(f"{key}: holds {negative} negative values; block absmax values are >= 0")


def _check_table(t: torch.Tensor, key: str, expected: torch.Tensor, what: str) -> None:
    if t.shape != expected.shape or not torch.equal(t.detach().float().cpu(), expected):
        raise ValueError(f"{key}: is not the {what} (shape {tuple(t.shape)}, dtype {t.dtype})")


def checked_weight(
    state: dict, prefix: str, check_record: Callable[[QuantStateRecord, str], None] | None = None
) -> NF4Weight:
    """The NF4Weight of ``state`` (keys ``prefix`` + "weight", ".absmax", ...) after checking every tensor and field.

    ``state`` must hold ``weight``, ``weight.absmax``, ``weight.quant_map`` and the record; ``weight.nested_absmax``
    and ``weight.nested_quant_map`` exactly when the record is double-quantized. ``check_record(record, key)``
    (e.g. "the format and shape a layer needs") runs on the parsed record before the tensors are checked.
    """
    w = f"{prefix}weight"
    key = f"{w}.{BNB_QUANT_STATE_KEY}"
    record = parse_record(_tensor(state, key), key)
    if check_record is not None:
        check_record(record, key)
    _check_tensor(_tensor(state, w), w, torch.uint8, (math.prod(record.shape) + 1) // 2)
    _check_table(_tensor(state, f"{w}.quant_map"), f"{w}.quant_map", nf4_code(), "NF4 code table")
    double_quant = record.double_quant
    for name in ("nested_absmax", "nested_quant_map"):
        present = f"{w}.{name}" in state
        if present != double_quant:
            say = "double-quantized" if double_quant else "not double-quantized (no nested_* fields)"
            raise ValueError(
                f"{w}.{name}: {'missing' if double_quant else 'present'}, but the quant-state record is {say}"
            )
    absmax = _tensor(state, f"{w}.absmax")
    if double_quant:
        _check_tensor(absmax, f"{w}.absmax", torch.uint8, record.nblocks)
        nested = _tensor(state, f"{w}.nested_absmax")
        _check_tensor(nested, f"{w}.nested_absmax", torch.float32, -(-record.nblocks // NESTED_BLOCKSIZE), True)
        table = _tensor(state, f"{w}.nested_quant_map")
        _check_table(table, f"{w}.nested_quant_map", dynamic_map(), "8-bit dynamic map of double quantization")
    else:
        _check_tensor(absmax, f"{w}.absmax", torch.float32, record.nblocks, True)
    local = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(w)}
    return NF4Weight.from_bnb_state_dict(local, "weight")


def checked_bias(state: dict, key: str, out_features: int) -> torch.Tensor:
    """``state[key]`` after checking it is a finite floating tensor of shape (out_features,)."""
    bias = _tensor(state, key)
    if not bias.is_floating_point():
        raise ValueError(f"{key}: must be a floating-point tensor, got dtype {bias.dtype}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{key}: must have shape ({out_features},), got {tuple(bias.shape)}")
    bad = (~torch.isfinite(bias)).sum().item()
    if bad:
        raise ValueError(f"{key}: holds {bad} non-finite values (NaN/Inf)")
    return bias
