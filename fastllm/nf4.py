"""The NF4 format: ``NF4Weight`` and the quantize / dequantize front doors.

Bytes are identical to bitsandbytes (>= 0.46) ``quantize_4bit(..., quant_type="nf4")``:
blocks of ``blocksize`` consecutive elements of the row-major flattened weight, one fp32
absmax per block, two 4-bit codes per byte with the first element in the high nibble.
With double quantization the absmax vector is centred on its mean and quantized again
with the 8-bit dynamic map in blocks of 256.

The work is done by the C++ extension (``fastllm._C``) when it is built, else by
``fastllm.reference``; both produce the same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from fastllm import _backend, reference
from fastllm.codebook import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_map, nf4_code

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Name of the packed JSON record in a bitsandbytes Linear4bit state dict (after "weight.").
BNB_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


@dataclass
class NF4Weight:
    """A weight quantized to NF4 (frozen; holds no autograd state).

    Attributes:
        data: uint8 [(numel + 1) // 2], packed codes, first element in the high nibble.
        absmax: fp32 [nblocks] block scales, or uint8 [nblocks] 8-bit codes of
            (absmax - offset) when double-quantized.
        blocksize: elements per block (power of two, 32..4096).
        shape: shape of the original weight.
        dtype: dtype of the original weight (the default dequantize dtype).
        nested_absmax: fp32 [ceil(nblocks / 256)] when double-quantized, else None.
        offset: fp32 scalar tensor (the mean of absmax) when double-quantized, else None.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (packed codes and scales, nested statistics included)."""
        tensors = [self.data, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(data, absmax, nested_absmax, offset): the weight's tensors, in the order every ``fastllm::`` NF4 op takes
        them (nested_absmax and offset are None without double quantization). Inverse of :meth:`from_tensors`."""
        return self.data, self.absmax, self.nested_absmax, self.offset

    @classmethod
    def from_tensors(
        cls,
        tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        blocksize: int,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
    ) -> NF4Weight:
        """The weight whose :meth:`tensors` are ``tensors`` (no copy), with its layout ints and original dtype."""
        data, absmax, nested_absmax, offset = tensors
        return cls(data, absmax, blocksize, torch.Size(shape), dtype, nested_absmax, offset)

    def block_scales(self) -> torch.Tensor:
        """fp32 [nblocks]: the per-block absmax, nested dequantization applied."""
        if self.double_quant and _backend.has_op("decode_scales", self.device):
            return torch.ops.fastllm.decode_scales(
                self.absmax, self.nested_absmax, self.offset, dynamic_map(self.device)
            )
        return reference.block_scales(self.absmax, self.nested_absmax, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight of shape ``self.shape`` in ``dtype`` (default: the original dtype)."""
        return dequantize(self, dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on ``device`` (same bytes)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            data=self.data.to(device),
            absmax=self.absmax.to(device),
            nested_absmax=move(self.nested_absmax),
            offset=move(self.offset),
        )

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' ``Linear4bit`` saves for this weight, keyed ``prefix`` + suffix.

        Keys: ``prefix`` (packed uint8 [(numel + 1) // 2, 1]), ``.absmax``, ``.quant_map``,
        and when double-quantized ``.nested_absmax``, ``.nested_quant_map``; then
        ``.quant_state.bitsandbytes__nf4`` (uint8 bytes of a JSON record).
        """
        out = {
            prefix: self.data.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_code(self.device),
        }
        record: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = dynamic_map(self.device)
            record.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype="float32",
                nested_offset=self.offset.item(),
            )
        payload = json.dumps(record).encode("utf-8")
        out[f"{prefix}.{BNB_QUANT_STATE_KEY}"] = torch.tensor(list(payload), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
        """Rebuild from a bitsandbytes ``Linear4bit`` state dict (nf4, uint8 storage).

        Raises KeyError naming a missing key and ValueError naming a key whose shape,
        dtype or record is wrong.
        """

        def get(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise KeyError(f"bitsandbytes state dict is missing {key!r}")
            return state_dict[key]

        record_key = f"{prefix}.{BNB_QUANT_STATE_KEY}"
        try:
            record = json.loads(bytes(get(record_key).cpu().numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{record_key!r} does not hold a JSON quant-state record: {exc}") from exc
        if record.get("quant_type") != "nf4":
            raise ValueError(f"{record_key!r}: quant_type must be 'nf4', got {record.get('quant_type')!r}")
        blocksize = int(record["blocksize"])
        if blocksize not in ALLOWED_BLOCKSIZES:
            raise ValueError(f"{record_key!r}: blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize}")
        shape = torch.Size(record["shape"])
        dtype = _DTYPES_BY_NAME.get(record["dtype"])
        if dtype is None:
            raise ValueError(f"{record_key!r}: dtype must be one of {sorted(_DTYPES_BY_NAME)}, got {record['dtype']!r}")
        numel = math.prod(shape)
        nblocks = -(-numel // blocksize)
        data = get(prefix)
        _expect(prefix, data, torch.uint8, (numel + 1) // 2)
        absmax = get(f"{prefix}.absmax")
        nested = "nested_offset" in record
        _expect(f"{prefix}.absmax", absmax, torch.uint8 if nested else torch.float32, nblocks)
        nested_absmax = offset = None
        if nested:
            nested_absmax = get(f"{prefix}.nested_absmax")
            _expect(f"{prefix}.nested_absmax", nested_absmax, torch.float32, -(-nblocks // NESTED_BLOCKSIZE))
            offset = torch.tensor(float(record["nested_offset"]), dtype=torch.float32, device=data.device)
        return cls(data.reshape(-1), absmax, blocksize, shape, dtype, nested_absmax, offset)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The dtypes a bitsandbytes quant-state record may name ("bfloat16", ...).
_DTYPES_BY_NAME = {_dtype_name(d): d for d in FLOAT_DTYPES}


def _expect(key: str, tensor: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    if tensor.dtype != dtype:
        raise ValueError(f"{key!r} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.numel() != numel:
        raise ValueError(f"{key!r} must hold {numel} elements, got shape {tuple(tensor.shape)}")


def check_blocksize(blocksize: int) -> None:
    """Raise ValueError unless ``blocksize`` is one bitsandbytes accepts (32, 64, ..., 4096), as an int."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (any shape, fp32/fp16/bf16) to NF4, bytes identical to bitsandbytes.

    Raises TypeError for a non-floating dtype, ValueError for an empty or meta tensor, a bad
    blocksize, or NaN/Inf values (with their count).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    if weight.is_meta:
        raise ValueError("weight is on the meta device (it holds no values to quantize); load or materialize it first")
    check_blocksize(blocksize)
    weight = weight.detach()
    if _backend.has_op("quantize_nf4", weight.device):
        # The kernel counts NaN/Inf while it scans for the absmax and raises the same ValueError.
        packed, absmax, nested_absmax, offset = torch.ops.fastllm.quantize_nf4(
            weight.contiguous(), blocksize, double_quant, dynamic_map(weight.device)
        )
        if not double_quant:
            nested_absmax = offset = None
    else:
        bad = (~torch.isfinite(weight)).sum().item()
        if bad:
            raise ValueError(f"weight has {bad} non-finite values (NaN or Inf); refusing to quantize")
        packed, absmax, nested_absmax, offset = reference.quantize_nf4(weight, blocksize, double_quant)
    return NF4Weight(packed, absmax, blocksize, weight.shape, weight.dtype, nested_absmax, offset)


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight, shape ``w.shape``, in ``dtype`` (default ``w.dtype``); fp32 math then cast."""
    dtype = dtype or w.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if _backend.has_op("dequantize_nf4", w.device):
        scales = w.block_scales()
        flat = torch.ops.fastllm.dequantize_nf4(w.data, scales, w.blocksize, w.numel, dtype)
        return flat.reshape(w.shape)
    return reference.dequantize_nf4(w.data, w.absmax, w.nested_absmax, w.offset, w.blocksize, w.shape, dtype)
