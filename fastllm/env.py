"""Print what fastllm will run on this machine: ``python -m fastllm.env``.

Versions (python, torch, triton, bitsandbytes, ...), the devices, whether the C++
extension ``fastllm._C`` is loaded (and why not), which of its ops have CPU / CUDA
kernels, which instruction set the CPU kernels use (AVX-512, AVX2 or scalar), whether Triton
can run (a GPU, or ``TRITON_INTERPRET=1`` on the CPU) and which NF4-matmul and attention path each device takes.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from fastllm import _backend
from fastllm.kernels._config import uses_triton


def _version(distribution: str) -> str:
    # From the installed metadata: importing bitsandbytes or torchao is slow and noisy.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " + (
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def _cpu_isa() -> str:
    # The instruction-set variant of the C++ CPU kernels (FASTLLM_CPU_ISA forces one), or why none runs.
    forced = os.environ.get("FASTLLM_CPU_ISA")
    try:
        isa = torch.ops.fastllm.cpu_isa()
    except (AttributeError, RuntimeError, ValueError) as exc:  # no such op (old build), or a bad FASTLLM_CPU_ISA
        return f"unavailable: {exc}"
    return f"{isa} (forced by FASTLLM_CPU_ISA)" if forced else f"{isa} (the best this CPU runs)"


def _matmul_path(device: torch.device) -> str:
    if uses_triton(device):
        where = " (interpreter)" if device.type == "cpu" else ""
        large = "fused dequantize-matmul or dequantize + cuBLAS, timed at first use"
        return f"Triton GEMV for small M; large M: {large}{where}"
    gemv = "C++ nf4_gemv for M <= 16" if _backend.has_op("nf4_gemv", device) else "no fused GEMV"
    dequant = "C++" if _backend.has_op("dequantize_nf4", device) else "reference"
    return f"{gemv}; else {dequant} dequantize (banded or whole weight, timed at first use) + torch matmul"


def _attention_path(device: torch.device) -> str:
    if uses_triton(device):
        return "Triton fused attention" + (" (interpreter)" if device.type == "cpu" else "")
    return "PyTorch fused CPU attention (SDPA's kernel); fp32 reference under softcap"


def report() -> str:
    """The environment report as text (what ``python -m fastllm.env`` prints)."""
    lines = [
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    for module in ("triton", "bitsandbytes", "torchao", "transformers", "peft"):
        lines.append(f"{module:<13} {_version(module)}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    lines.append("")
    if _backend.extension_loaded():
        lines.append(f"fastllm._C    loaded (CUDA kernels {'built' if _backend.cuda_built() else 'not built'})")
        lines.append(f"  CPU kernels  {_cpu_isa()}")
    else:
        lines.append(f"fastllm._C    not loaded: {_backend.extension_error()}")
    for op in _backend.EXTENSION_OPS:
        cpu = "yes" if _backend.has_op(op, "cpu") else "no"
        cuda = "yes" if _backend.has_op(op, "cuda") else "no"
        lines.append(f"  fastllm::{op:<15} CPU {cpu:<4} CUDA {cuda}")
    lines.append("")
    for device in _devices():
        lines.append(f"{device}: {_device_name(device)}")
        triton_state = "runs" if uses_triton(device) else "does not run (no GPU, TRITON_INTERPRET unset)"
        lines.append(f"  triton     {triton_state}")
        lines.append(f"  nf4 matmul {_matmul_path(device)}")
        lines.append(f"  attention  {_attention_path(device)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
