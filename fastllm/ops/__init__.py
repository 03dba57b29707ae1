"""The one registry of ``fastllm::`` operators (``torch.ops.fastllm.<name>``): one file per op family.

Each file declares its ops once (schema, fake, autograd) with the CPU implementation as the op body; the kernel
modules (``fastllm.kernels``) register device kernels on top. This package never imports a kernel module.
"""
