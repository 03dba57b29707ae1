"""Facts recorded with every measurement: device, library versions, git commit, copy bandwidth."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("fastllm", "torch", "triton", "bitsandbytes", "torchao", "peft", "transformers", "flash-attn")


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name for results: "cpu" for any CPU, else the lower-cased GPU name ("nvidia-h200")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def versions() -> dict[str, str | None]:
    """Installed versions of fastllm and every reference (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def git_commit() -> str:
    """HEAD of the repository, with "+dirty" when the work tree has changes; "unknown" outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def copy_bandwidth_gbps(device: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write (2 x bytes).

    The %-of-bandwidth figures of GB/s rows are relative to this number measured in the same run.
    """
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    else:
        import time

        dst.copy_(src)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
    return 2 * n / (ms * 1e-3) / 1e9


def interpreter_note() -> str:
    """Say whether Triton's interpreter is off (the benchmark needs the compiled / C++ paths)."""
    if os.environ.get("TRITON_INTERPRET"):
        return "WARNING: TRITON_INTERPRET is set; fastllm kernels run in the interpreter"
    return "TRITON_INTERPRET is not set (compiled kernels; the CPU C++ path on CPU)"
