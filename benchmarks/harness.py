"""What a suite declares (``Case``), how one call is timed, and the byte / FLOP models.

A suite returns a list of ``Case`` objects. Each case is one provider (fastllm or a
reference) on one shape; its ``setup`` builds the inputs and returns the callable to
time, or raises ``Skip`` with the reason (reference not installed, needs CUDA, piece of
fastllm not there yet). Nothing here imports fastllm or a reference library.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

# Figures a case can report; ``Case.work`` is counted in the unit before the "/s".
METRICS = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0}


class Skip(Exception):
    """Raised by a case's setup (or a suite) when it cannot run here; the message is the reason."""


@dataclass
class Settings:
    """Run-wide options: where to run and how big.

    ``quick`` picks the README's short case list; ``tiny`` shrinks every shape so the
    smoke test finishes in seconds (it implies ``quick``).
    """

    device: torch.device
    quick: bool = False
    tiny: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    """One provider on one shape.

    Attributes:
        suite, case: names; rows with the same (suite, case, shape, dtype) are compared.
        shape: named sizes, e.g. {"M": 1, "N": 4096, "K": 4096}.
        dtype: name of the compute dtype ("bfloat16").
        provider: "fastllm" or the reference's name ("bnb", "torchao", "dense", ...).
        metric: a key of ``METRICS``.
        work: bytes, FLOPs or tokens of one call (the figure is work / median time).
        setup: builds inputs; returns the callable to time, or (callable, extra dict).
        track_memory: record the peak CUDA memory of one call (``extra["peak_mem_GiB"]``).
    """

    suite: str
    case: str
    shape: dict[str, int]
    dtype: str
    provider: str
    metric: str
    work: float
    setup: Callable[[], object]
    track_memory: bool = False
    extra: dict[str, object] = field(default_factory=dict)


def require(module: str, what: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``Skip`` saying it is not installed (``what`` names the package)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{what or module} not installed ({exc})") from exc


def require_attr(module: str, name: str) -> object:
    """``module.name`` or ``Skip`` (used for fastllm pieces that may not have landed yet)."""
    mod = require(module)
    if not hasattr(mod, name):
        raise Skip(f"{module}.{name} not available")
    return getattr(mod, name)


def torchao_nf4() -> ModuleType:
    """torchao's NF4 module (``to_nf4``, ``linear_nf4``); it moved from torchao.dtypes.nf4tensor in 0.16."""
    require("torchao")
    for name in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise Skip("torchao is installed but has no NF4 module")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Milliseconds of one warm call: the median (the reported figure) and the fastest call.

    On a shared CPU the minimum shows what the code does when nothing else runs; the median is
    what the tables report.
    """

    median_ms: float
    min_ms: float
    reps: int | None
    timer: str


def _cpu_rounds(fns: Sequence[Callable[[], object]], settings: Settings) -> list[list[float]]:
    """Seconds of warm calls of each of ``fns`` on the CPU, timed in rounds: one call of each per round, the order
    rotated from round to round, until every call has ``min_reps`` times and the time budget (per call) is spent."""
    warmup, min_reps, max_reps, budget_s = (1, 3, 5, 0.2) if settings.tiny else (2, 5, 50, 1.0)
    if not settings.quick:
        budget_s = 3.0
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start, rounds = time.perf_counter(), 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s * len(fns)):
        for i in range(len(fns)):
            j = (i + rounds) % len(fns)
            t0 = time.perf_counter()
            fns[j]()
            times[j].append(time.perf_counter() - t0)
        rounds += 1
    return times


def _cpu_timing(times: list[float], timer: str) -> Timing:
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, len(times), timer)


def time_ms(fn: Callable[[], object], settings: Settings) -> Timing:
    """Time warm calls of ``fn``.

    GPU: ``triton.testing.do_bench`` (warm-up, L2 flushed between calls; median and min quantiles).
    CPU: warm calls timed with ``time.perf_counter``, at least ``min_reps`` and then until a time
    budget is spent.
    """
    if settings.cuda:
        from triton.testing import do_bench

        rep = 100 if settings.quick else 300
        median, fastest = do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.0])
        return Timing(float(median), float(fastest), None, "triton.testing.do_bench")
    (times,) = _cpu_rounds([fn], settings)
    return _cpu_timing(times, "median of warm runs (time.perf_counter)")


def time_interleaved(fns: Sequence[Callable[[], object]], settings: Settings) -> list[Timing]:
    """Time calls that are compared with each other, one Timing per call.

    CPU: in rounds (``_cpu_rounds``), so that a change of machine load during the run falls on every call alike and
    their ratios hold on a shared machine where back-to-back timings drift. GPU: each call on its own (``time_ms``).
    """
    if settings.cuda or len(fns) == 1:
        return [time_ms(fn, settings) for fn in fns]
    timer = f"median of warm runs, interleaved round by round with {len(fns) - 1} other call(s) (time.perf_counter)"
    return [_cpu_timing(times, timer) for times in _cpu_rounds(fns, settings)]


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of an NF4 weight in the bitsandbytes layout.

    Packed codes (numel / 2) + one absmax per block (uint8 code when double-quantized,
    else fp32) + with double quantization one fp32 scale per 256 blocks and the fp32 offset.
    About 4.127 bits per weight at blocksize 64 with double quantization.
    """
    nblocks = math.ceil(numel / blocksize)
    if not double_quant:
        return (numel + 1) // 2 + 4 * nblocks
    return (numel + 1) // 2 + nblocks + 4 * math.ceil(nblocks / 256) + 4


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def seeded(seed: int, device: torch.device) -> torch.Generator:
    """A generator so every provider of a case sees the same random inputs."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int, scale: float = 1.0):
    """Normal random tensor (drawn in fp32, then cast), reproducible from ``seed``."""
    t = torch.randn(shape, generator=seeded(seed, device), device=device, dtype=torch.float32)
    return (t * scale).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    out, ref = out.double(), ref.double()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()
