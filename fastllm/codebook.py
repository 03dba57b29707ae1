"""The two code tables of the bitsandbytes-compatible NF4 format (the single Python source).

``NF4_CODE`` maps a 4-bit index to its normalised value; ``dynamic_map()`` is the signed
8-bit "dynamic" map bitsandbytes uses for double quantization of the per-block absmax.
The C++ extension keeps its own copy of ``NF4_CODE`` in ``csrc/nf4.h`` and a test checks
that both agree; the 8-bit map is always passed to C++/Triton as a tensor from here.
"""

from __future__ import annotations

import functools

import torch

# Quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al. 2023), index 0..15.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Index of the code 0.0: the nibble bitsandbytes pads an odd-length tensor with.
NF4_ZERO_INDEX = 7

# Double quantization quantizes (absmax - mean) in blocks of this many values.
NESTED_BLOCKSIZE = 256

ALLOWED_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table as a float32 tensor of shape (16,)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_map_values() -> tuple[float, ...]:
    # Signed dynamic 8-bit type (Dettmers 2015): 1 sign bit, up to 7 exponent bits written
    # in unary as leading zeros, the rest a linear fraction. For exponent e (0..6) the
    # fraction grid has 2**e + 1 boundaries in [0.1, 1]; each code is the midpoint of two
    # neighbours, scaled by 10**(e - 6): 2 * (1 + 2 + ... + 64) = 254 codes. Then 0 and 1
    # are appended and the list is sorted.
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    assert len(values) == 256
    return tuple(values)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map, float32 of shape (256,), sorted."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32, device=device)
