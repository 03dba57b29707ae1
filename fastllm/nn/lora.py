"""``LoraLinear``: a frozen base linear (NF4 or dense) plus a trainable low-rank update.

    y = x @ W^T + b + scale * (dropout(x) @ A^T) @ B^T,   A (r, in), B (out, r), scale = alpha / r
    (alpha / sqrt(r) with rsLoRA).

The whole layer is one ``torch.autograd.Function``. It saves x, the dropout mask (bool), the small
(..., r) activation and the frozen weight's own tensors (the packed NF4 bytes, never a dense copy);
backward recomputes W on the fly in the fused ``grad_y @ W`` kernel:

    grad_B = scale * grad_y^T @ h                       h = dropout(x) @ A^T   (..., r)
    grad_h = scale * grad_y @ B                                                (..., r)
    grad_A = grad_h^T @ dropout(x)
    grad_x = grad_y @ W + dropout'(grad_h @ A)          dropout' multiplies by mask / keep
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastllm.nf4 import NF4Weight
from fastllm.nn.linear_nf4 import LinearNF4, check_input, compute_dtype_for, nf4_linear, nf4_linear_t

LORA_INITS = ("kaiming", "gaussian")


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): weight stored transposed, (in_features, out_features)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def _split_weight(base: LinearNF4 | nn.Linear) -> tuple[tuple | None, tuple]:
    # The frozen weight as (meta, tensors) for the autograd function, which must see its tensors as
    # arguments: meta is None for a dense base (tensors[0] is the (N, K) weight), else the NF4 layout.
    if isinstance(base, nn.Linear):
        return None, (base.weight, None, None, None)
    w = base.nf4_weight()
    return (w.blocksize, w.shape, w.dtype), w.tensors()


def _base_weight(
    meta: tuple | None,
    data: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
) -> NF4Weight | torch.Tensor:
    # The inverse of _split_weight.
    if meta is None:
        return data
    return NF4Weight.from_tensors((data, absmax, nested_absmax, offset), *meta)


def _dropout(x: torch.Tensor, mask: torch.Tensor | None, keep: float) -> torch.Tensor:
    # Inverted dropout with a given bool keep-mask (None: no dropout): x * mask / keep.
    return x if mask is None else x * mask.to(x.dtype) / keep


def _base_matmul(x: torch.Tensor, w: NF4Weight | torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(w, NF4Weight):
        return nf4_linear(x, w, bias)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def _base_matmul_t(grad_y: torch.Tensor, w: NF4Weight | torch.Tensor) -> torch.Tensor:
    # grad_y @ W, fused dequantize-matmul for NF4 (W never materialized on the kernel paths).
    if isinstance(w, NF4Weight):
        return nf4_linear_t(grad_y, w)
    return grad_y @ w.to(grad_y.dtype)


class _LoraLinearFunction(torch.autograd.Function):
    """y = base(x) + scale * (dropout(x) @ A^T) @ B^T with a hand-written backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, mask, scale, keep, meta, data, absmax, nested_absmax, offset):
        w = _base_weight(meta, data, absmax, nested_absmax, offset)
        h = _dropout(x, mask, keep) @ lora_a.t()
        y = _base_matmul(x, w, bias) + (h @ lora_b.t()) * scale
        ctx.save_for_backward(x, mask, h, lora_a, lora_b, data, absmax, nested_absmax, offset)
        ctx.scale, ctx.keep, ctx.meta = scale, keep, meta
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, h, lora_a, lora_b, data, absmax, nested_absmax, offset = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_a = grad_b = grad_bias = None
        if need_b:
            grad_b = (grad_y2.t() @ h.reshape(-1, h.shape[-1])) * ctx.scale
        if need_a or need_x:
            grad_h = (grad_y @ lora_b) * ctx.scale
        if need_a:
            xd = _dropout(x, mask, ctx.keep)
            grad_a = grad_h.reshape(-1, grad_h.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
        if need_x:
            w = _base_weight(ctx.meta, data, absmax, nested_absmax, offset)
            grad_x = _base_matmul_t(grad_y, w) + _dropout(grad_h @ lora_a, mask, ctx.keep)
        if need_bias:
            grad_bias = grad_y2.sum(0)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None, None, None, None, None, None


class LoraLinear(nn.Module):
    """A frozen linear layer with a trainable LoRA update; x (..., in_features) -> (..., out_features).

    Args:
        base_layer: the frozen base, a :class:`LinearNF4` or a dense ``nn.Linear`` (its parameters
            are set to requires_grad=False).
        r: rank (> 0).
        alpha: LoRA alpha (> 0); scale = alpha / r, or alpha / sqrt(r) when ``use_rslora``.
        dropout: dropout probability on the LoRA branch's input, in [0, 1).
        use_rslora: rank-stabilized scaling.
        init: "kaiming" (A ~ kaiming-uniform with a=sqrt(5), as PEFT) or "gaussian" (A ~ N(0, 1/r^2));
            B starts at zero, so the layer starts equal to its base.
        fan_in_fan_out: the layer replaced a transformers ``Conv1D`` (merging gives a Conv1D back).
        lora_dtype: dtype of A and B (fp32 default; cast to the compute dtype in forward).
    """

    def __init__(
        self,
        base_layer: LinearNF4 | nn.Linear,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        fan_in_fan_out: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_lora_args(r, alpha, dropout, use_rslora)
        if not isinstance(base_layer, (LinearNF4, nn.Linear)):
            raise TypeError(f"base_layer must be a LinearNF4 or nn.Linear, got {type(base_layer).__name__}")
        if init not in LORA_INITS:
            raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.fan_in_fan_out = fan_in_fan_out
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=lora_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=lora_dtype, device=device))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1 / r)

    @property
    def scaling(self) -> float:
        """The factor of the LoRA branch: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return getattr(self.base_layer, "compute_dtype", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        quantize: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        init: str = "kaiming",
    ) -> LoraLinear:
        """Wrap a dense ``nn.Linear`` or transformers ``Conv1D``: quantized to NF4, or frozen as is.

        A Conv1D's (in, out) weight is transposed to (out, in) first (``fan_in_fan_out=True``).
        """
        check_lora_args(r, alpha, dropout, use_rslora)
        conv1d = is_conv1d(linear)
        if conv1d:
            dense = nn.Linear(linear.nx, linear.nf, device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(linear.weight.t())
                dense.bias.copy_(linear.bias)
        elif isinstance(linear, nn.Linear):
            dense = linear
        else:
            raise TypeError(f"linear must be an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        base = LinearNF4.from_linear(dense, blocksize, double_quant, compute_dtype) if quantize else dense
        return cls(base, r, alpha, dropout, use_rslora, init, fan_in_fan_out=conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        base = self.base_layer
        dtype, autocast = compute_dtype_for(x, self.compute_dtype)
        xc = x.to(dtype)
        mask = None
        if self.training and self.dropout > 0:
            # Same random stream as F.dropout(x) (as PEFT's nn.Dropout draws it), kept as a bool mask.
            mask = torch.nn.functional.dropout(torch.ones_like(xc), self.dropout, training=True) != 0
        meta, w = _split_weight(base)
        bias = None if base.bias is None else base.bias.to(dtype)
        y = _LoraLinearFunction.apply(
            xc, self.lora_A.to(dtype), self.lora_B.to(dtype), bias, mask, self.scaling, 1.0 - self.dropout, meta, *w
        )
        return y if autocast else y.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32, shape (out_features, in_features)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}"


def check_lora_args(r: int, alpha: float, dropout: float, use_rslora: bool = False) -> None:
    """Raise ValueError unless r is a positive int, alpha a finite number > 0 and 0 <= dropout < 1; TypeError
    unless use_rslora is a bool."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (LoRA rank) must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (LoRA alpha) must be a number > 0 (finite), got {alpha!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {use_rslora!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
