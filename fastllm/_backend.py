"""Which compiled backends are active, and why not when they are not.

``fastllm._C`` (built from csrc/ by setup.py) registers ops in the ``torch.ops.fastllm``
namespace for the CPU and, when compiled with nvcc, the CUDA dispatch key; their schemas
are documented in ``csrc/bindings.cpp``. Their fake (meta) implementations are registered
in the op registry (``fastllm.ops.nf4``) so ``torch.compile`` can trace them. Set
``FASTLLM_DISABLE_EXT=1`` to force the plain PyTorch reference path.
"""

from __future__ import annotations

import os

import torch

# The ops fastllm._C defines (torch.ops.fastllm.<name>).
EXTENSION_OPS: tuple[str, ...] = ("quantize_nf4", "decode_scales", "dequantize_nf4", "nf4_gemv")

_extension_error: str | None = None
_cuda_built = False

if os.environ.get("FASTLLM_DISABLE_EXT") == "1":
    _extension_error = "disabled by FASTLLM_DISABLE_EXT=1"
else:
    try:
        from fastllm import _C  # (importing registers torch.ops.fastllm.*)

        _cuda_built = bool(_C.cuda_built())
    except ImportError as exc:
        _extension_error = f"fastllm._C not importable: {exc}"


def extension_loaded() -> bool:
    """True when ``fastllm._C`` was imported and its ops are registered."""
    return _extension_error is None


def extension_error() -> str | None:
    """Why the extension is not active (None when it is)."""
    return _extension_error


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return extension_loaded() and _cuda_built


def has_op(name: str, device: torch.device | str) -> bool:
    """Whether ``torch.ops.fastllm.<name>`` has a compiled kernel for ``device``."""
    if not extension_loaded() or name not in EXTENSION_OPS:
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _cuda_built)
