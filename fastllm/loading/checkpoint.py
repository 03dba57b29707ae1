"""Read safetensors checkpoints tensor by tensor, with plain file reads (no mmap), validating as it goes.

Why not ``safetensors.safe_open``: it memory-maps every shard, and every page a read touches stays in
the process's resident set until the file is closed, so loading a checkpoint that way costs its
whole size in RSS on top of the model being built. Here each tensor lives only until the loader has
quantized or placed it: the page cache holds the file, the process holds one tensor.

- A tensor the model keeps dense is read (``readinto``) into its own memory and checked for NaN/Inf.
- A tensor about to be quantized is mapped alone (private mapping of its byte range, no copy); the
  quantize kernel reads it once and counts NaN/Inf itself, and the mapping goes when the tensor does.

A checkpoint directory holds ``model.safetensors`` or ``model.safetensors.index.json`` plus the
shards it names. Errors name the file and the tensor: a missing shard (FileNotFoundError), a header
that does not parse, a tensor whose bytes lie beyond the end of its file (truncated), an index entry
whose shard does not hold that tensor (ValueError), NaN/Inf in a floating tensor (ValueError, on read).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # NaN/Inf checked on read
_HEADER_LIMIT = 100 * 2**20  # the safetensors spec caps the JSON header at 100 MB


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``file``, its ``name`` there, dtype, shape and absolute byte range [start, end)."""

    file: Path
    name: str
    dtype_name: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, checked against the file size (ValueError names file and tensor)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: not a safetensors file (only {size} bytes, truncated?)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise ValueError(f"{file}: header length {header_len} exceeds the file ({size} bytes); truncated?")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: header is not valid JSON ({exc}); truncated or corrupt") from exc
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file}: tensor {name!r} has a malformed header entry {info!r}") from exc
        if dtype_name not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes, shape {list(shape)} needs {nbytes}")
        if base + end > size:
            raise ValueError(
                f"{file}: tensor {name!r} ends at byte {base + end} but the file has {size} bytes (truncated file)"
            )
        entries[name] = TensorEntry(file, name, dtype_name, shape, base + begin, base + end)
    return entries


def read_tensor(entry: TensorEntry, check_finite: bool = True) -> torch.Tensor:
    """The tensor ``entry`` names, read from disk into a new CPU tensor.

    ``check_finite``: raise ValueError (naming file and tensor, with the count) if a floating tensor holds NaN/Inf.
    """
    nbytes = entry.end - entry.start
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{entry.file}: tensor {entry.name!r} is cut short at byte {entry.start + done}")
            done += n
    tensor = buf.view(entry.dtype).reshape(entry.shape)
    if check_finite and tensor.dtype in _CHECKED_DTYPES and tensor.numel():
        check_finite_values(tensor, f"{entry.file}: tensor {entry.name!r}")
    return tensor


def map_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor ``entry`` names as a CPU tensor over a private (copy-on-write) mapping of its bytes alone.

    Nothing is copied; the pages are read as the tensor is, and unmapped when the tensor is freed.
    """
    numel = math.prod(entry.shape)
    if numel == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    start = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY
    with open(entry.file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), entry.end - start, offset=start, access=mmap.ACCESS_COPY)
    # The tensor keeps the mapping alive (frombuffer holds a reference to it).
    return torch.frombuffer(mapped, dtype=entry.dtype, count=numel, offset=entry.start - start).reshape(entry.shape)


def check_finite_values(tensor: torch.Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if ``tensor`` holds NaN or Inf.

    One summing pass (NaN and Inf propagate into the sum); only when the sum is not finite are the
    bad values counted (a finite tensor whose sum overflows passes that second check).
    """
    if torch.isfinite(tensor.sum()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"{what} holds {bad} non-finite values (NaN or Inf) of {tensor.numel()}")


class LazyTensor:
    """A checkpoint tensor not read yet: ``t[...]`` reads it (what transformers' loader calls to materialize a
    tensor); ``get_dtype()`` / ``get_shape()`` answer like a safetensors slice without reading.

    ``quantized``: the loader quantizes this tensor right away, so it is mapped (:func:`map_tensor`) rather
    than copied, and its NaN/Inf check is left to the quantize kernel.
    """

    def __init__(self, entry: TensorEntry, quantized: bool = False):
        self.entry = entry
        self.quantized = quantized

    def __getitem__(self, index) -> torch.Tensor:
        tensor = map_tensor(self.entry) if self.quantized else read_tensor(self.entry)
        return tensor if index is Ellipsis else tensor[index]

    def get_dtype(self) -> str:
        return self.entry.dtype_name

    def get_shape(self) -> list[int]:
        return list(self.entry.shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.entry.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    def is_floating_point(self) -> bool:
        return self.entry.dtype.is_floating_point

    def __repr__(self) -> str:
        e = self.entry
        return f"LazyTensor({e.file.name}:{e.name}, {e.dtype_name}, {list(e.shape)})"


def checkpoint_entries(directory: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors checkpoint in ``directory``, by name, validated against its index and shards.

    Raises FileNotFoundError when neither ``model.safetensors`` nor an index exists, or a shard the index names
    is missing; ValueError for an index entry whose shard lacks the tensor, or a corrupt / truncated shard.
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map' object): {exc}") from exc
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        entries = {}
        for shard, names in shards.items():
            file = directory / shard
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard missing (the index {INDEX_FILE} puts {names[0]!r} there)")
            in_file = read_header(file)
            for name in names:
                if name not in in_file:
                    raise ValueError(f"{file}: the index {INDEX_FILE} names tensor {name!r} but this shard lacks it")
                entries[name] = in_file[name]
        return entries
    single = directory / SINGLE_FILE
    if single.is_file():
        return read_header(single)
    raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (fastllm loads safetensors checkpoints)")


def lazy_state_dict(entries: dict[str, TensorEntry], quantized: set[str] = frozenset()) -> dict[str, LazyTensor]:
    """A state dict of :class:`LazyTensor` for transformers' loader (``from_pretrained(state_dict=...)``);
    the names in ``quantized`` are mapped, not copied (see :class:`LazyTensor`)."""
    return {name: LazyTensor(entry, name in quantized) for name, entry in entries.items()}
