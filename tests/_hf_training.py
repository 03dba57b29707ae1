"""Helpers shared by the Trainer, TRL and accelerate tests: a learnable token dataset, a loss recorder, and a
context manager that keeps the NF4 matmuls and attention off the interpreted Triton kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from _tiny_models import VOCAB
from transformers import TrainerCallback

from fastllm.kernels import _config
from fastllm.ops.attention import attention_bwd, attention_fwd
from fastllm.ops.linear_cross_entropy import linear_cross_entropy_backward_op, linear_cross_entropy_op
from fastllm.ops.nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_t

# fastllm's ops that the kernel modules give a Triton implementation on CPU tensors under TRITON_INTERPRET=1.
_TRITON_CPU_OPS = (
    nf4_dequantize,
    nf4_matmul,
    nf4_matmul_t,
    attention_fwd,
    attention_bwd,
    linear_cross_entropy_op,
    linear_cross_entropy_backward_op,
)


@contextlib.contextmanager
def plain_cpu_path() -> Iterator[None]:
    """Within it, NF4 matmuls, attention and the fused loss take the plain CPU path (each op's own CPU
    implementation: C++ / PyTorch) instead of the Triton kernels under the interpreter, which their own tests cover:
    training runs stay within the time budget. The kernel modules register the Triton kernels as the ops' CPU
    implementation at import under the interpreter; those registrations are disabled here
    (``CustomOpDef.set_kernel_enabled``), and ``_config.INTERPRET`` reads False for the code that checks it at each
    call. (Subprocess workers get ``TRITON_INTERPRET=0`` instead.)"""
    saved = _config.INTERPRET
    try:
        with contextlib.ExitStack() as stack:
            if saved:  # the Triton kernels are registered for CPU only under the interpreter
                for op in _TRITON_CPU_OPS:
                    stack.enter_context(op.set_kernel_enabled("cpu", False))
            _config.INTERPRET = False
            yield
    finally:
        _config.INTERPRET = saved


def arithmetic_rows(n: int, seq: int, seed: int = 123) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM examples of ``seq`` tokens: id_t = (a + b t) mod (VOCAB - 1) + 1 with random (a, b) per row.
    Learnable from context, so the loss falls within a few steps; labels = input_ids, no padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(1, VOCAB, (2,), generator=g).tolist()
        ids = (a + b * torch.arange(seq)) % (VOCAB - 1) + 1
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


class LossLog(TrainerCallback):
    """The training losses a run logs itself, by global step (``state.log_history`` also holds those of the
    checkpoint it resumed from)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def logged_losses(trainer) -> dict[int, float]:
    """The losses recorded by ``trainer``'s :class:`LossLog` callback."""
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LossLog)).losses
