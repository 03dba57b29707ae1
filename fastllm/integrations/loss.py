"""``use_fused_loss(model)``: a Hugging Face causal LM computes its training loss without materializing the logits.

The model's own forward still runs unchanged (embeddings, decoder, norm, ``logits_to_keep``, any processing of the
logits); two instance attributes are set, nothing in the class or the state dict changes:

- ``model.forward`` (when called with ``labels``) calls the original forward with ``labels=None`` and the rest of its
  arguments as given, while
- the output embeddings' ``forward`` (``lm_head``), during that call only, records its input (the last hidden
  states) and returns a three-column probe instead of the (B, S, V) logits. Whatever the model does to its logits
  after the head is done to the probe; comparing the probe before and after tells whether the model soft-caps its
  logits (Gemma 2's ``final_logit_softcapping``: c * tanh(x / c)) or leaves them alone. Any other change of the
  logits (scaling, masking) is refused with a ValueError rather than trained on silently.

The loss is then ``fastllm.kernels.linear_cross_entropy`` on the recorded hidden states, with transformers'
``ForCausalLMLoss`` semantics: labels shifted left by one (or ``shift_labels`` as given), ``ignore_index``, the sum
divided by ``num_items_in_batch`` when given (gradient accumulation in ``Trainer``), else the mean over the labels
not ignored.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.kernels import linear_cross_entropy
from fastllm.nn.linear_nf4 import LinearNF4

# Logit values the head returns while recording: exact in bf16, large enough that a softcap of any usual size
# visibly bends them (30 * tanh(64 / 30) = 29.1).
_PROBE = (16.0, 64.0, -128.0)


@dataclass
class _State:
    """Per-model state of the wrapper: recording on/off, the recorded hidden states, the detected softcap."""

    recording: bool = False
    hidden: torch.Tensor | None = None
    softcap: float | None = None
    checked: bool = False
    originals: dict = field(default_factory=dict)


def _causal_lm(model: nn.Module) -> nn.Module:
    # A PEFT model forwards to the transformers model it wraps: that is the one to patch.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_weight(head: nn.Module):
    """(weight: dense tensor or NF4Weight, bias) of the output embeddings; TypeError for a head the loss cannot take."""
    if isinstance(head, LinearNF4):
        dtype = head.compute_dtype
        return head.nf4_weight(), head.bias, dtype
    if type(head) is nn.Linear:
        return head.weight, head.bias, None
    raise TypeError(
        f"use_fused_loss: the output embeddings are a {type(head).__name__}; the fused loss takes an nn.Linear "
        "(tied or not) or a fastllm LinearNF4 head (a LoRA-adapted head is not supported: leave lm_head out of "
        "target_modules)"
    )


def _softcap_of(model: nn.Module, probe_out: torch.Tensor | None) -> float | None:
    """What the model did to the probe logits: nothing (None) or c * tanh(x / c) (c); ValueError otherwise."""
    if probe_out is None:
        raise ValueError("use_fused_loss: the model's forward returned no logits, so its logit processing is unknown")
    if probe_out.numel() == 0:
        return None
    got = probe_out.reshape(-1, len(_PROBE))[0].double().cpu()
    probe = torch.tensor(_PROBE, dtype=torch.float64)
    if torch.allclose(got, probe, rtol=1e-2, atol=0.0):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None) or getattr(model.config, "final_logit_softcapping", None)
    if cap and torch.allclose(got, cap * torch.tanh(probe / cap), rtol=1e-2, atol=1e-2):
        return float(cap)
    raise ValueError(
        f"use_fused_loss: {type(model).__name__} changes its logits after the output embeddings in a way the fused "
        f"loss does not reproduce (probe {list(_PROBE)} came out as {got.tolist()}); only a final logit softcapping "
        "is supported"
    )


def _shifted_labels(labels: torch.Tensor, kwargs: dict, ignore_index: int) -> torch.Tensor:
    # ForCausalLMLoss: position t predicts token t + 1; the last position has no target.
    if kwargs.get("shift_labels") is not None:
        return kwargs["shift_labels"]
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def use_fused_loss(model: nn.Module) -> nn.Module:
    """Make a causal LM compute its loss with :func:`fastllm.kernels.linear_cross_entropy` when given labels.

    Works for transformers causal LMs whose forward ends in ``logits = lm_head(hidden)`` followed by
    ``self.loss_function`` (``ForCausalLMLoss``): Llama and its relatives, Gemma 2 (``final_logit_softcapping``),
    GPT-2 (tied embeddings), the LLaVA language model; also through a PEFT ``PeftModel`` (the wrapped model is
    patched). The head may be a plain ``nn.Linear`` (tied or not; its weight and bias get gradients when they
    require them) or a fastllm ``LinearNF4``.

    With ``labels``, the returned output has ``loss`` as transformers computes it (label shift, ``ignore_index``,
    ``shift_labels``, ``num_items_in_batch``) but **``logits`` is None**: the (B, S, V) logits are never formed.
    Without labels the model behaves exactly as before (logits returned). Every other output field is unchanged.
    An evaluation that needs logits with labels (``Trainer`` with ``compute_metrics``) must run without the fused
    loss (``prediction_loss_only=True``, or :func:`remove_fused_loss` first).
    A model whose ``loss_function`` was replaced, or that transforms its logits in any way other than a final
    softcapping, raises ValueError instead of training on a different loss. Undo with :func:`remove_fused_loss`.

    Returns ``model`` (patched in place; calling it again is a no-op).
    """
    target = _causal_lm(model)
    if hasattr(target, "_fastllm_fused_loss"):
        return model
    if not hasattr(target, "get_output_embeddings") or target.get_output_embeddings() is None:
        raise TypeError(f"use_fused_loss: {type(target).__name__} has no output embeddings (not a causal LM)")
    head = target.get_output_embeddings()
    _head_weight(head)  # refuse an unsupported head now, not at the first training step
    state = _State()
    forward, head_forward = target.forward, head.forward
    state.originals = {"forward": forward, "head": head, "head_forward": head_forward}
    signature = inspect.signature(forward)

    def recording_head(x: torch.Tensor) -> torch.Tensor:
        if not state.recording:
            return head_forward(x)
        state.hidden = x
        return x.new_tensor(_PROBE).expand(*x.shape[:-1], len(_PROBE))

    @functools.wraps(forward)
    def fused_forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        labels = _take_labels(bound)
        if labels is None:
            return forward(*args, **kwargs)
        _check_loss_function(target)
        extra = bound.kwargs
        return_dict = extra.pop("return_dict", None)
        state.recording, state.hidden = True, None
        try:
            out = forward(*bound.args, **extra)
        finally:
            state.recording = False
        hidden, state.hidden = state.hidden, None
        if hidden is None:
            raise ValueError(f"use_fused_loss: {type(target).__name__}.forward did not call its output embeddings")
        if not state.checked:
            state.softcap, state.checked = _softcap_of(target, out.logits), True
        loss = _loss(head, hidden, labels, extra, state.softcap)
        # A new output of the same class: loss first, logits left out (as a ModelOutput leaves out None fields).
        out = type(out)(**{**out, "loss": loss, "logits": None})
        return out.to_tuple() if return_dict is False else out

    target.forward = fused_forward
    head.forward = recording_head
    target._fastllm_fused_loss = state
    return model


def _take_labels(bound: inspect.BoundArguments) -> torch.Tensor | None:
    """The ``labels`` argument (named, or in the ``**kwargs`` of forward(*args, **kwargs)), set to None in ``bound``."""
    params = bound.signature.parameters
    if "labels" in params:
        labels, bound.arguments["labels"] = bound.arguments.get("labels"), None
        return labels
    var_kw = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return bound.arguments.get(var_kw, {}).pop("labels", None) if var_kw else None


def _check_loss_function(model: nn.Module) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"use_fused_loss: {type(model).__name__}.loss_function is {model.loss_function!r}, not transformers' "
            "ForCausalLMLoss; the fused loss only reproduces ForCausalLMLoss"
        )


def _loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, kwargs: dict, softcap: float | None):
    """ForCausalLMLoss of the head's logits of ``hidden`` (B, S, H) against ``labels`` (B, S), fused."""
    ignore_index = kwargs.get("ignore_index", -100)
    targets = _shifted_labels(labels, kwargs, ignore_index).to(hidden.device)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels: shape {tuple(targets.shape)} does not match the {tuple(hidden.shape[:-1])} positions the model "
            "computes logits for (logits_to_keep with labels?)"
        )
    weight, bias, compute_dtype = _head_weight(head)
    dtype = compute_dtype or (weight.dtype if isinstance(weight, torch.Tensor) else hidden.dtype)
    hidden = hidden.to(dtype)
    if bias is not None:
        bias = bias.to(dtype)
    return linear_cross_entropy(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, softcap=softcap,
        num_items=kwargs.get("num_items_in_batch"),
    )  # fmt: skip


def remove_fused_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`use_fused_loss` (the model computes logits and its own loss again); a no-op if not applied."""
    target = _causal_lm(model)
    state = target.__dict__.pop("_fastllm_fused_loss", None)
    if state is not None:
        del target.forward
        del state.originals["head"].forward
    return model
