"""Process-wide switches of the Triton kernels, read once at import (shared by attention and NF4 kernels).

- ``INTERPRET``: ``TRITON_INTERPRET=1``. Triton decides at decoration time whether ``@triton.jit`` kernels run
  compiled (GPU) or in the CPU interpreter, so the dispatch below must follow the value seen at import.
- ``device_guard``: every launch runs inside it, on its tensors' device and that device's current stream.
- ``AUTOTUNE``: ``FASTLLM_AUTOTUNE=0`` makes every autotuned kernel launch its first (default) config alone,
  with no timing of the others, e.g. for a GPU test run over many odd shapes, where each new shape bucket or
  mask kind would otherwise compile and time every candidate.
"""

from __future__ import annotations

import contextlib
import os
from typing import TypeVar

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("FASTLLM_AUTOTUNE", "1") != "0"

T = TypeVar("T")


def uses_triton(device: torch.device) -> bool:
    """True when tensors on ``device`` go through the Triton kernels (CUDA, or CPU under the interpreter)."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current device for a Triton launch (Triton launches on the current device and
    its current stream); a no-op for CPU tensors (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def tuning_candidates(gpu: list[T], interpreter: T) -> list[T]:
    """The configs an autotuner tries: ``interpreter`` alone under the interpreter (fast tests), else the GPU
    list, cut to its first (default) entry when ``FASTLLM_AUTOTUNE=0``."""
    if INTERPRET:
        return [interpreter]
    return gpu if AUTOTUNE else gpu[:1]
