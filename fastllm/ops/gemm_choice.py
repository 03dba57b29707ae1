"""Which large-M NF4 matmul path runs: measured on first use, cached per process.

Two paths compete for ``nf4_matmul`` / ``nf4_matmul_t`` with more than ``SMALL_M`` rows:

- ``"fused"``: W dequantized tile by tile inside the GEMM (GPU: the fused Triton kernel; CPU: the banded path,
  one cache-sized band of W dequantized before each matmul).
- ``"dequant"``: the whole W dequantized into a scratch buffer, then one ``torch.matmul`` (cuBLAS / the CPU BLAS).

``FASTLLM_NF4_GEMM=auto|fused|dequant`` (read at each call; default ``auto``) forces a path. With ``auto`` the
first call for a key (direction, M bucket, N, K, dtype, device) times both paths on the real inputs and keeps the
faster; its output is the one returned. Nothing is measured (and the default ``fused`` runs) under CUDA graph
capture, where timing would synchronize, nor under the Triton interpreter, which would time Python.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterator

import torch

ENV = "FASTLLM_NF4_GEMM"
MODES = ("auto", "fused", "dequant")
PATHS = ("fused", "dequant")
# Timed runs of each path at first use (after one warm-up run on the GPU, where it compiles and autotunes).
REPEATS = 3


# Set by ``forced`` (benchmarks timing one path); wins over the environment variable.
_forced: str | None = None


@contextlib.contextmanager
def forced(path: str) -> Iterator[None]:
    """Run every large-M NF4 matmul inside the block on ``path`` ("fused" or "dequant"), as the environment variable
    would (for benchmarks that time each path)."""
    global _forced
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def requested_mode() -> str:
    """The forced path, else ``FASTLLM_NF4_GEMM`` (default "auto"); ValueError naming the variable for any other
    value."""
    if _forced is not None:
        return _forced
    mode = os.environ.get(ENV, "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def m_bucket(m: int) -> int:
    """Row-count bucket of a choice: the next power of two (capped at 16384)."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)


def _time_ms(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    # Milliseconds of one call of fn on device (CUDA events on its current stream, else wall clock) and its output.
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


class PathChooser:
    """Picks "fused" or "dequant" per key by timing both at first use (see the module docstring).

    ``choices`` maps key -> path; ``timings`` maps key -> {path: median ms}. ``can_measure(device)`` says whether
    timing is allowed now; ``timer(fn, device) -> (ms, out)`` measures one call (replaceable in tests).
    """

    def __init__(self, can_measure: Callable[[torch.device], bool], default: str = "fused"):
        self.can_measure = can_measure
        self.default = default
        self.timer = _time_ms
        self.choices: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}

    def run(self, key: Hashable, paths: dict[str, Callable[[], torch.Tensor]], device: torch.device) -> torch.Tensor:
        """The output of the chosen path for ``key``; ``paths`` maps "fused" / "dequant" to zero-argument calls."""
        mode = requested_mode()
        if mode != "auto":
            return paths[mode]()
        choice = self.choices.get(key)
        if choice is not None:
            return paths[choice]()
        if not self.can_measure(device):
            return paths[self.default]()
        return self._measure(key, paths, device)

    def _measure(self, key, paths, device) -> torch.Tensor:
        if device.type == "cuda":  # warm-up: Triton compiles and autotunes, cuBLAS picks its algorithm
            for fn in paths.values():
                fn()
        samples: dict[str, list[float]] = {name: [] for name in paths}
        outputs = {}
        for _ in range(REPEATS):  # interleaved, so a load change on a shared machine hits both paths alike
            for name, fn in paths.items():
                ms, outputs[name] = self.timer(fn, device)
                samples[name].append(ms)
        timing = {name: statistics.median(ms) for name, ms in samples.items()}
        choice = min(timing, key=timing.get)
        self.timings[key] = timing
        self.choices[key] = choice
        return outputs[choice]


def gpu_can_measure(device: torch.device) -> bool:
    """Timing is allowed on a CUDA device outside graph capture."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def cpu_can_measure(device: torch.device) -> bool:
    """Timing is allowed for the CPU's C++ / BLAS paths."""
    return device.type == "cpu"


# One chooser per implementation family: the Triton paths (CUDA; CPU under the interpreter, never measured there)
# and the C++ / BLAS CPU paths of fastllm.ops.nf4.
GPU_GEMM = PathChooser(gpu_can_measure)
CPU_GEMM = PathChooser(cpu_can_measure)


def all_timings() -> dict[str, dict[Hashable, dict[str, float]]]:
    """Every first-use measurement so far, {"gpu": ..., "cpu": ...}: key -> {path: median ms} (for benchmarks)."""
    return {"gpu": dict(GPU_GEMM.timings), "cpu": dict(CPU_GEMM.timings)}
