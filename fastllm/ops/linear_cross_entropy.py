"""``fastllm::linear_cross_entropy``: the cross-entropy of ``hidden @ weight.T (+ bias)`` without the (T, V) logits.

The op walks the tokens in chunks of ``chunk_rows`` rows, small enough that one chunk's logits (rows, V) stay about
the size of the hidden states (at least ``_CHUNK_ELEMENTS``, 64 MiB of fp32). Per chunk:

1. logits = hidden[chunk] @ W^T (+ b): a dense matmul, or ``fastllm::nf4_matmul`` when W is NF4 (dequantized in
   bands or in registers, never whole);
2. a row pass (``rows_fn``) turns the chunk into per-token losses and, where gradients are wanted, into
   dlogits = d loss / d logits in place (softmax - smoothed one-hot, through the softcap's chain rule);
3. grad_hidden[chunk] = dlogits @ W (``fastllm::nf4_matmul_t`` for NF4), grad_W += dlogits^T @ hidden[chunk],
   grad_b += sum of dlogits.

Where the gradients are formed: with ``reduce=True`` (reduction "sum"/"mean") the loss is one scalar, so the
gradients of its sum are formed in the forward, in the same chunk pass that computes the loss (as Liger-Kernel
does), and backward only scales them by the incoming scalar. That costs one logits matmul per chunk instead of two
(recomputing in backward would redo step 1) and keeps (T, H) grad_hidden (plus an fp32 (V, H) grad_W only when
the head is trained) alive until backward: far below the (T, V) logits. With ``reduce=False`` (reduction "none")
each token's loss gets its own incoming gradient, unknown in the forward, so the forward computes losses only and
``fastllm::linear_cross_entropy_backward`` recomputes the chunks with the incoming per-token weights.

The body registered here is the CPU path (PyTorch row pass). ``fastllm.kernels`` registers the Triton row pass for
CUDA (and for CPU under ``TRITON_INTERPRET=1``) through :func:`chunked`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastllm.ops.cpu_matmul import bands, matmul_dtype

# A chunk's logits hold at least this many elements (and about as many as the hidden states (T, H) when larger):
# 64 MiB of fp32. Measured on the 2-core CPU (T=1024, V=32000, H=1024 fp32, fwd+bwd): 2^22 elements (128-row chunks)
# ran 1.03x the time of F.cross_entropy on the materialized logits, 2^24 (512 rows) 0.86x.
_CHUNK_ELEMENTS = 1 << 24
# Chunks are whole multiples of this many rows (tensor-core friendly M).
_ROW_MULTIPLE = 16

# rows_fn(logits (R, V), labels (R,), row_scale (R,) or None, ignore_index, label_smoothing, softcap, grad)
#   -> (losses (R,) in the accumulation dtype, dlogits (R, V) in logits.dtype (may reuse logits' memory) or None)
RowsFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: the dtype of the row math, the losses and grad_W/grad_b accumulators."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the chunk's logits (rows, vocab) hold about max(tokens * hidden, _CHUNK_ELEMENTS) elements."""
    budget = max(tokens * hidden, _CHUNK_ELEMENTS) // vocab
    return max(_ROW_MULTIPLE, budget - budget % _ROW_MULTIPLE)


def rows_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row pass in PyTorch (see ``RowsFn``). With z = softcap(logits), lse = log sum_v exp z_v and
    eps = label_smoothing, a token's loss is lse - (1 - eps) z_y - eps * mean_v z_v (0 for ignored tokens), and
    d loss / d logits = (softmax(z) - (1 - eps) onehot(y) - eps / V) * dz/dlogits, dz/dlogits = 1 - (z / cap)^2.

    Few passes over the (R, V) chunk and, for fp32 logits without softcap, no (R, V) allocation: the exponentials
    are computed in place (in the logits' memory) and reused for the softmax."""
    vocab = logits.shape[1]
    z = logits.to(accumulation_dtype(logits.dtype))  # the logits themselves when already fp32/fp64
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]
    z_y = z.gather(1, target)[:, 0]
    z_mean = z.mean(dim=1) if label_smoothing else None
    cap_grad = 1.0 - (z / softcap) ** 2 if softcap is not None and grad else None
    m = z.amax(dim=1)
    e = z.sub_(m[:, None]).exp_()  # exp(z - m), over z's memory
    total = e.sum(dim=1)
    lse = m + torch.log(total)
    losses = lse - (1.0 - label_smoothing) * z_y
    if z_mean is not None:
        losses -= label_smoothing * z_mean
    losses = torch.where(valid, losses, 0.0)
    if not grad:
        return losses, None
    weight = valid.to(e.dtype) if row_scale is None else torch.where(valid, row_scale.to(e.dtype), 0.0)
    d = e.mul_((weight / total)[:, None])  # weight * softmax(z)
    if label_smoothing:
        d.sub_((weight * (label_smoothing / vocab))[:, None])
    d.scatter_add_(1, target, (weight * (label_smoothing - 1.0))[:, None])
    if cap_grad is not None:
        d.mul_(cap_grad)
    return losses, d.to(logits.dtype)


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in [0, vocab) or ignore_index: ValueError on the CPU, an asynchronous device assert on CUDA
    (no host sync; the row pass masks its label loads either way, so a bad label never reads out of bounds)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), f"labels must be in [0, {vocab}) or ignore_index")
    elif bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {labels[bad][:5].tolist()}"
        )


def _logits(h, weight, absmax, nested_absmax, offset, blocksize, bias, vocab) -> torch.Tensor:
    if absmax is None:
        return F.linear(h, weight, bias)
    return torch.ops.fastllm.nf4_matmul(h, weight, absmax, nested_absmax, offset, bias, blocksize, vocab)


# A 16-bit dense head on a CPU without native 16-bit matmuls (``cpu_matmul``) multiplies in fp32 (3.1x faster for
# T=1024, H=1024, V=32000 bf16 there), one band of vocabulary rows at a time: each band of W is upcast where it is
# used, so no fp32 copy of the head exists whole. (An NF4 head's matmuls make the same choice themselves.)
_CPU_HEAD_BAND_BYTES = 8 << 20


def _head_upcast(hidden: torch.Tensor, absmax: torch.Tensor | None) -> torch.dtype | None:
    """The dtype a dense head multiplies in when not hidden's own (CPU without native 16-bit matmuls), else None."""
    if absmax is not None or hidden.device.type != "cpu":
        return None
    compute = matmul_dtype(hidden.dtype)
    return None if compute == hidden.dtype else compute


def _head_bands(weight: torch.Tensor, dtype: torch.dtype) -> list[slice]:
    """Bands of the head's vocabulary rows, each about _CPU_HEAD_BAND_BYTES once upcast to ``dtype``."""
    return bands(weight.shape[0], weight.shape[1], dtype, _CPU_HEAD_BAND_BYTES)


def _banded_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """h (R, H) @ W^T (+ b) -> (R, V) in dtype, W upcast a band of rows at a time."""
    hc = h.to(dtype)
    logits = torch.empty((h.shape[0], weight.shape[0]), dtype=dtype, device=h.device)
    for band in _head_bands(weight, dtype):
        logits[:, band] = hc @ weight[band].to(dtype).T
    return logits if bias is None else logits.add_(bias)


def _banded_grad_hidden(d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d (R, V) @ W -> (R, H) in d's dtype, W upcast a band of rows at a time."""
    out = torch.zeros((d.shape[0], weight.shape[1]), dtype=d.dtype, device=d.device)
    for band in _head_bands(weight, d.dtype):
        out.addmm_(d[:, band], weight[band].to(d.dtype))
    return out


def chunked(
    rows_fn: RowsFn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    vocab: int,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(losses (T,), grad_hidden (T, H) in hidden.dtype, grad_W (V, H) and grad_b (V,) in the accumulation dtype):
    the per-token losses and the gradients of sum_t row_scale[t] * loss[t] (row_scale None: all ones), each
    gradient only when asked for (else None). See the module docstring for the chunk steps."""
    tokens, width = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    losses = torch.empty(tokens, dtype=acc, device=hidden.device)
    g_h = torch.empty_like(hidden) if grad_hidden else None
    g_w = torch.zeros((vocab, width), dtype=acc, device=hidden.device) if grad_weight else None
    g_b = torch.zeros(vocab, dtype=acc, device=hidden.device) if grad_bias else None
    grad = grad_hidden or grad_weight or grad_bias
    upcast = _head_upcast(hidden, absmax)
    step = chunk_rows(tokens, width, vocab)
    for start in range(0, tokens, step):
        rows = slice(start, min(tokens, start + step))
        h = hidden[rows]
        if upcast is not None:
            logits = _banded_logits(h, weight, bias, upcast)
        else:
            logits = _logits(h, weight, absmax, nested_absmax, offset, blocksize, bias, vocab)
        scale = None if row_scale is None else row_scale[rows]
        losses[rows], d = rows_fn(logits, labels[rows], scale, ignore_index, label_smoothing, softcap, grad)
        if g_h is not None:
            if upcast is not None:
                g_h[rows] = _banded_grad_hidden(d, weight)
            elif absmax is None:
                torch.matmul(d, weight, out=g_h[rows])
            else:
                g_h[rows] = torch.ops.fastllm.nf4_matmul_t(d, weight, absmax, nested_absmax, offset, blocksize, width)
        if g_w is not None:
            g_w += (d.T @ h.to(d.dtype)).to(acc)
        if g_b is not None:
            g_b += d.sum(0, dtype=acc)
    return losses, g_h, g_w, g_b


# ---- the ops ------------------------------------------------------------------------------------------------------


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("fastllm::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    vocab: int,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    reduce: bool,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) on the CPU; see :func:`forward` for the arguments."""
    return forward(rows_torch, hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels,
                   ignore_index, label_smoothing, softcap, reduce, grad_hidden, grad_weight, grad_bias)  # fmt: skip


def forward(
    rows_fn: RowsFn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    vocab: int,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    reduce: bool,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op's body for one row pass.

    hidden (T, H) float; weight dense (V, H) in hidden.dtype, or NF4 packed uint8 with its ``absmax`` /
    ``nested_absmax`` / ``offset`` / ``blocksize`` (then ``vocab`` = V rows); bias (V,) or None; labels (T,) int64.
    Returns ``loss``: the sum of the per-token losses (fp32 scalar; fp64 for fp64 inputs) when ``reduce``, else the
    per-token losses (T,); and, only when ``reduce``, the gradients of that sum asked for by the three flags
    (grad_hidden (T, H) in hidden.dtype; grad_weight (V, H), grad_bias (V,) in the accumulation dtype), empty (0,)
    tensors for the rest.
    """
    check_labels(labels, vocab, ignore_index)
    formed = reduce and (grad_hidden or grad_weight or grad_bias)
    losses, g_h, g_w, g_b = chunked(
        rows_fn, hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels, None,
        ignore_index, label_smoothing, softcap, formed and grad_hidden, formed and grad_weight, formed and grad_bias,
    )  # fmt: skip
    loss = losses.sum() if reduce else losses
    return tuple(t if t is not None else _empty(loss) for t in (loss, g_h, g_w, g_b))


@linear_cross_entropy_op.register_fake
def _(hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels, ignore_index, label_smoothing,
      softcap, reduce, grad_hidden, grad_weight, grad_bias):  # fmt: skip
    acc = accumulation_dtype(hidden.dtype)
    tokens, width = hidden.shape
    loss = hidden.new_empty(() if reduce else (tokens,), dtype=acc)
    g_h = hidden.new_empty((tokens, width)) if reduce and grad_hidden else hidden.new_empty((0,), dtype=acc)
    g_w = hidden.new_empty((vocab, width) if reduce and grad_weight else (0,), dtype=acc)
    g_b = hidden.new_empty((vocab,) if reduce and grad_bias else (0,), dtype=acc)
    return loss, g_h, g_w, g_b


@torch.library.custom_op("fastllm::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    vocab: int,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    grad_losses: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_t grad_losses[t] * loss[t] on the CPU; see :func:`backward`."""
    args = (hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels, grad_losses)
    return backward(rows_torch, *args, ignore_index, label_smoothing, softcap, grad_hidden, grad_weight, grad_bias)


def backward(
    rows_fn: RowsFn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    vocab: int,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    grad_losses: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op's body for one row pass: the chunks recomputed with per-token weights ``grad_losses`` (T,);
    gradients as in :func:`forward` (empty (0,) where not asked for)."""
    _, g_h, g_w, g_b = chunked(
        rows_fn, hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels, grad_losses,
        ignore_index, label_smoothing, softcap, grad_hidden, grad_weight, grad_bias,
    )  # fmt: skip
    return tuple(t if t is not None else _empty(grad_losses) for t in (g_h, g_w, g_b))


@linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels, grad_losses, ignore_index,
      label_smoothing, softcap, grad_hidden, grad_weight, grad_bias):  # fmt: skip
    acc = accumulation_dtype(hidden.dtype)
    tokens, width = hidden.shape
    g_h = hidden.new_empty((tokens, width)) if grad_hidden else grad_losses.new_empty((0,))
    g_w = hidden.new_empty((vocab, width), dtype=acc) if grad_weight else grad_losses.new_empty((0,))
    g_b = hidden.new_empty((vocab,), dtype=acc) if grad_bias else grad_losses.new_empty((0,))
    return g_h, g_w, g_b


# ---- autograd -----------------------------------------------------------------------------------------------------

_FLAGS = slice(13, 16)  # grad_hidden, grad_weight, grad_bias among the forward op's inputs


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, absmax, nested_absmax, offset, blocksize, vocab, bias, labels = inputs[:9]
    ctx.ignore_index, ctx.label_smoothing, ctx.softcap, ctx.reduce = inputs[9:13]
    ctx.flags = inputs[_FLAGS]
    ctx.blocksize, ctx.vocab = blocksize, vocab
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    if ctx.reduce:  # the gradients were formed in the forward: keep them, not the inputs
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, absmax, nested_absmax, offset, bias, labels)


def _backward(ctx, grad_loss, _g_h, _g_w, _g_b):
    # reduce: loss = sum_t loss_t, whose gradients were formed in the forward; scale them by the incoming scalar.
    # else: loss is (T,); recompute the chunks with the incoming per-token weights.
    if ctx.reduce:
        g_h, g_w, g_b = ctx.saved_tensors
        g_h, g_w, g_b = (g * grad_loss.to(g.dtype) if g.numel() else None for g in (g_h, g_w, g_b))
    else:
        hidden, weight, absmax, nested_absmax, offset, bias, labels = ctx.saved_tensors
        grads = linear_cross_entropy_backward_op(
            hidden, weight, absmax, nested_absmax, offset, ctx.blocksize, ctx.vocab, bias, labels,
            grad_loss.contiguous(), ctx.ignore_index, ctx.label_smoothing, ctx.softcap, *ctx.flags,
        )  # fmt: skip
        g_h, g_w, g_b = (g if flag else None for g, flag in zip(grads, ctx.flags, strict=True))
    g_w = None if g_w is None else g_w.to(ctx.weight_dtype)
    g_b = None if g_b is None else g_b.to(ctx.bias_dtype)
    return g_h, g_w, None, None, None, None, None, g_b, *(None,) * 8


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
