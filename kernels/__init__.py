"""Triton kernels of fastllm (installed as ``fastllm.kernels``).

- ``nf4_matmul`` / ``nf4_matmul_t`` / ``nf4_dequantize``: NF4 weights dequantized in registers.
- ``attention`` / ``attention_varlen``: fused flash attention, forward and backward.
- ``linear_cross_entropy``: cross-entropy of ``hidden @ weight.T`` (dense or NF4) without the (T, V) logits.
"""

if __name__ != "fastllm.kernels":
    # This folder installs as fastllm.kernels. With the repository root on sys.path (``python -m pytest``, a
    # notebook started in the clone) it is also found as a top-level ``kernels``: the name of another PyPI
    # package, which transformers (``is_kernels_available``: find_spec, then import_module when no metadata
    # names a version) and bitsandbytes (``from kernels import get_kernel``) probe for. Loading this folder
    # under that name would register every torch.library op and Triton kernel a second time, and raising
    # here would escape transformers' probe and break ``import transformers``. So the folder answers as an
    # absent package: it puts None in sys.modules (Python's marker for "import blocked") and runs nothing.
    # The import in progress then yields None, which transformers reads as "not installed" (no __file__, no
    # __version__) and bitsandbytes' ``from kernels import ...`` turns into an ImportError it catches; every
    # later ``import kernels`` raises ModuleNotFoundError and ``importlib.util.find_spec("kernels")`` is None.
    import sys

    sys.modules[__name__] = None
else:
    from .attention import attention, attention_varlen
    from .cross_entropy_fused import linear_cross_entropy
    from .nf4_api import nf4_dequantize, nf4_matmul, nf4_matmul_t

    __all__ = [
        "attention",
        "attention_varlen",
        "nf4_matmul",
        "nf4_matmul_t",
        "nf4_dequantize",
        "linear_cross_entropy",
    ]
