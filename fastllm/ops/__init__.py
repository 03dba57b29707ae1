"""The one registry of ``fastllm::`` operators (``torch.ops.fastllm.<name>``).

Each op family declares its ops in one file here: the schema (``torch.library.custom_op``, or the C++ schema of
``csrc/bindings.cpp`` for the extension's ops), the fake (meta) implementation that ``torch.compile`` traces, the
autograd formula, and the CPU implementation (C++ extension or PyTorch). Device kernels are registered on top by
the kernel modules (``fastllm.kernels``: ``torch.library.register_kernel(op, "cuda")``, and ``"cpu"`` under
``TRITON_INTERPRET=1``), so the op a caller dispatches to depends only on its tensors' device.

Layering: this package sits above ``fastllm.nf4`` / ``fastllm._C`` / ``fastllm.reference`` and below
``fastllm.kernels``; it never imports a kernel module.

- :mod:`fastllm.ops.nf4`: quantize_nf4 / decode_scales / dequantize_nf4 / nf4_gemv (C++ schemas; fakes here),
  nf4_dequantize, nf4_matmul, nf4_matmul_t.
- :mod:`fastllm.ops.attention`: attention_fwd / attention_bwd (flash attention; the CPU body runs PyTorch's fused
  CPU attention where it can express the case, else the reference).
- :mod:`fastllm.ops.linear_cross_entropy`: linear_cross_entropy, linear_cross_entropy_backward (the fused
  linear + cross-entropy loss; chunked, never the (T, V) logits).
- :mod:`fastllm.ops.gemm_choice`, :mod:`fastllm.ops.cpu_matmul`: which large-M NF4 matmul path runs (timed at first
  use), and the dtype the CPU bodies multiply 16-bit inputs in.
"""

from fastllm.ops import attention, linear_cross_entropy, nf4

__all__ = ["attention", "linear_cross_entropy", "nf4"]
