"""Hugging Face transformers glue: ``attn_implementation="fastllm"`` runs ``fastllm.kernels.attention``.

Importing this module registers the implementation (``register()`` is idempotent)::

    import fastllm.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastllm")

transformers (5.x) builds masks only for implementations known to its ``AttentionMaskInterface``, so
"fastllm" is registered there with the SDPA mask builder: a 4-D bool mask (True = attend), or None
where SDPA would rely on ``is_causal``. The attention function does not apply that mask element by
element. It rebuilds the mask from what the kernel can express (causal from the module, the sliding
window from the layer, a key padding vector read off the mask), checks that the rebuild equals the
mask it was given, and raises a ValueError when it does not (custom or_mask/and_mask patterns, prefix-LM
masks, additive biases), so a model never silently gets a different mask.

Packed sequences (several sequences in one row, ``position_ids`` restarting at 0, e.g.
``DataCollatorWithFlattening``) are one more pattern the kernel expresses: a block-diagonal mask whose
blocks are causal (and windowed) on their own. Their boundaries come from the ``cu_seq_lens_q/k`` keyword
arguments when the caller passes them (as for flash-attention), else they are read off the mask; either way
the block-diagonal rebuild must equal the mask, and the rows run through ``attention_varlen`` as one
flattened (B * S, H, D) batch of sequences.

Query rows that see no key at all (e.g. left padding under a causal mask) output zeros here, where
eager attention outputs an average over all keys; those rows are padding and are ignored downstream.
"""

from __future__ import annotations

import collections
import weakref
from typing import NamedTuple

import torch

from fastllm import reference
from fastllm.integrations.loss import remove_fused_loss, use_fused_loss  # noqa: F401 (re-exported: issue 12)
from fastllm.kernels.attention import attention, attention_varlen

NAME = "fastllm"


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D HF mask (bool, or additive float with 0 = attend / large negative = masked) -> bool, True = attend."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask: expected a bool or floating-point 4-D mask, got dtype {mask.dtype}")
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | masked).all()):
        raise ValueError(
            "attention_mask: fastllm attention only takes masks whose entries are 0 (attend) or -inf / dtype min "
            "(masked); this additive mask carries a bias (e.g. ALiBi or relative positions) it cannot apply"
        )
    return ~masked


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int] | None:
    """HF sliding window -> kernel (left, right): causal keeps q - w < k <= q, bidirectional |q - k| <= w."""
    if sliding_window is None:
        return None
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _given_segments(kwargs: dict, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """Segment ids (B, S) from the ``cu_seq_lens_q/k`` keyword arguments (flattened offsets), or None without them."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    total = batch * q_len
    if not (isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor) and torch.equal(cu_q, cu_k)):
        raise ValueError("cu_seq_lens_q, cu_seq_lens_k: fastllm attention takes packed self-attention, equal offsets")
    cu = cu_q.to(torch.long).flatten()
    row_starts = torch.arange(0, total, q_len, device=cu.device)
    if q_len != k_len or int(cu[0]) != 0 or int(cu[-1]) != total or not bool(torch.isin(row_starts, cu).all()):
        raise ValueError(
            f"cu_seq_lens_q: expected offsets rising from 0 to {total} (= B * S for queries and keys of {q_len} "
            f"and {k_len} tokens) that start a sequence at every row, got {cu.tolist()}"
        )
    # a position's segment is the number of offsets after the first that it has reached
    return torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True).view(batch, q_len)


def _mask_segments(allowed: torch.Tensor) -> torch.Tensor | None:
    """Finest split of each row of a square mask (B, 1, S, S) into blocks no query looks across: segment ids (B, S),
    or None where a query sees no key (padding, not packing) or the mask is not square."""
    q_len, k_len = allowed.shape[-2:]
    if q_len != k_len or not bool(allowed.any(dim=-1).all()):
        return None
    index = torch.arange(q_len, device=allowed.device)
    first = torch.where(allowed[:, 0], index, q_len).amin(dim=-1)  # (B, S): first key each query sees
    last = torch.where(allowed[:, 0], index, -1).amax(dim=-1)
    # j starts a block when no query at or after j sees a key before j and no query before j sees one at or after j
    after_first = first.flip(-1).cummin(dim=-1).values.flip(-1)[:, 1:]
    before_last = last.cummax(dim=-1).values[:, :-1]
    starts = (after_first >= index[1:]) & (before_last < index[1:])
    return torch.cat([torch.zeros_like(first[:, :1]), starts.long().cumsum(dim=-1)], dim=-1)


def _packed_visibility(segments: torch.Tensor, causal: bool, window: tuple[int, int] | None) -> torch.Tensor:
    """What varlen attention over the blocks of ``segments`` (B, S) lets each query see: bool (B, 1, S, S)."""
    seq = segments.shape[1]
    within = reference.attention_visibility(seq, seq, causal=causal, window=window, device=segments.device)
    return within & (segments[:, :, None] == segments[:, None, :])[:, None]


def _packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: torch.Tensor, **options
) -> torch.Tensor:
    """query (B, H, S, D), key/value (B, Hkv, S, D), every row split into the blocks of ``segments`` (B, S) ->
    (B, S, H, D), attention within each block (``options`` as in ``attention_varlen``)."""
    batch, _, seq, _ = query.shape
    flat = segments + torch.arange(batch, device=segments.device)[:, None] * seq  # ids unique across rows
    flat = flat.flatten()
    starts = torch.cat([torch.ones_like(flat[:1], dtype=torch.bool), flat[1:] != flat[:-1]]).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([batch * seq])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = attention_varlen(q, k, v, cu, cu, longest, longest, **options)
    return out.view(batch, seq, *out.shape[1:])


class _MaskPlan(NamedTuple):
    """What a layer's mask means to the kernel: keys to keep (``k_len``; None = all), a key padding vector (B, Sk)
    or None, and packed-sequence segment ids (B, S) or None (then the rows run through ``attention_varlen``)."""

    k_len: int | None
    padding: torch.Tensor | None
    segments: torch.Tensor | None


class _PlanCache:
    """The plans of the last few masks: one forward passes the same mask (and offsets) tensor to every layer, and
    reading a mask costs host syncs, so each is read once. An entry holds weak references to its tensors and
    their versions (an in-place change or a new tensor at a reused address misses), plus the layer options."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.entries: collections.OrderedDict[tuple, tuple[list, _MaskPlan]] = collections.OrderedDict()

    @staticmethod
    def _stamp(tensors: tuple[torch.Tensor | None, ...]) -> list:
        return [None if t is None else (weakref.ref(t), t._version) for t in tensors]

    @staticmethod
    def _key(tensors: tuple[torch.Tensor | None, ...], options: tuple) -> tuple:
        return (*(None if t is None else id(t) for t in tensors), *options)

    def get(self, tensors: tuple[torch.Tensor | None, ...], options: tuple) -> _MaskPlan | None:
        entry = self.entries.get(self._key(tensors, options))
        if entry is None:
            return None
        stamps, plan = entry
        for t, stamp in zip(tensors, stamps, strict=True):
            if (t is None) != (stamp is None) or (t is not None and (stamp[0]() is not t or stamp[1] != t._version)):
                return None
        return plan

    def put(self, tensors: tuple[torch.Tensor | None, ...], options: tuple, plan: _MaskPlan) -> None:
        key = self._key(tensors, options)
        self.entries[key] = (self._stamp(tensors), plan)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_plans = _PlanCache()


def _mask_plan(
    attention_mask: torch.Tensor | None,
    segments: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    causal: bool,
    window: tuple[int, int] | None,
    sliding_window: int | None,
) -> _MaskPlan:
    """Read a 4-D mask (with the segments given by offsets, if any) as a ``_MaskPlan``; raise where the kernel
    cannot express it."""
    if attention_mask is None:
        return _MaskPlan(None, None, segments)
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, k_len):
        raise ValueError(f"attention_mask: expected shape (B, 1, {q_len}, {k_len}), got {tuple(attention_mask.shape)}")
    allowed = _bool_mask(attention_mask)
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            raise ValueError("attention_mask: fastllm attention needs the same mask for every head")
        allowed = allowed[:, :1]
    allowed = allowed.expand(batch, 1, q_len, k_len)
    kept, padding = None, None
    if segments is None:
        # Keys nobody sees at the end (unfilled static-cache slots) are dropped, so that the kernel's
        # bottom-right causal alignment lines up with the last real key.
        seen = allowed.any(dim=(0, 1, 2)).nonzero()
        kept = int(seen[-1]) + 1 if seen.numel() else 1
        allowed = allowed[..., :kept]
        padding = allowed.any(dim=2)[:, 0]  # (B, Sk): a key some query sees is not padding
        rebuilt = reference.attention_visibility(
            q_len, kept, causal=causal, window=window, key_padding_mask=padding, device=allowed.device
        )
        if torch.equal(rebuilt.expand_as(allowed), allowed):
            return _MaskPlan(kept, None if bool(padding.all()) else padding, None)
        # not one sequence per row: maybe several packed ones, each causal / windowed on its own
        segments = _mask_segments(allowed)
    if segments is None or not torch.equal(_packed_visibility(segments, causal, window), allowed):
        raise ValueError(
            f"attention_mask: fastllm attention expresses a mask as causal={causal}, sliding_window="
            f"{sliding_window} and a key padding vector, or as packed sequences each under that causal / "
            "window pattern (blocks on the diagonal, or the cu_seq_lens_q/k offsets); this mask has another "
            "pattern (a custom mask function, a prefix-LM mask, padding inside packed rows?). "
            "Use attn_implementation='sdpa' for it"
        )
    return _MaskPlan(None, None, segments)


def fastllm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, H, D), None).

    ``attention_mask`` is the 4-D bool (or 0/-inf additive) mask from the SDPA mask builder, shape
    (B or 1, 1, Sq, Sk), or None. Causality comes from ``is_causal`` (else ``module.is_causal``), the window
    from ``sliding_window`` (else ``module.sliding_window``), softcap and scaling from the layer. Packed rows
    (blocks on the mask's diagonal, or int ``cu_seq_lens_q`` == ``cu_seq_lens_k`` (n + 1,) offsets into the
    flattened B * S tokens among ``kwargs``) run as separate sequences through ``attention_varlen``. A mask (and
    offsets) tensor is read once and its reading reused by the next layers that get the same tensor.
    """
    if dropout:
        raise ValueError(
            f"dropout: fastllm attention has no attention dropout, got p={dropout}; set the model's attention "
            "dropout to 0 for training (or call model.eval())"
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError("position_bias: fastllm attention cannot add a position bias to the scores")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    window = _window(sliding_window, causal)
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    options = dict(causal=causal, scale=scaling, window=window, softcap=softcap)

    tensors = (attention_mask, kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"))
    cached = not torch.compiler.is_compiling() and any(t is not None for t in tensors)
    shape = (batch, q_len, k_len, causal, window, sliding_window)
    plan = _plans.get(tensors, shape) if cached else None
    if plan is None:
        segments = _given_segments(kwargs, batch, q_len, k_len)
        plan = _mask_plan(attention_mask, segments, batch, q_len, k_len, causal, window, sliding_window)
        if cached:
            _plans.put(tensors, shape, plan)

    if plan.segments is not None:
        return _packed_attention(query, key, value, plan.segments, **options), None
    if attention_mask is None:
        # Same reading of a missing mask as SDPA: causal only for more than one query; a longer key cache
        # without a mask only happens for an empty static cache, whose keys past the queries are unused.
        options["causal"] = causal and q_len > 1
        if options["causal"] and k_len > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    elif plan.k_len < k_len:
        key, value = key[:, :, : plan.k_len], value[:, :, : plan.k_len]
    out = attention(query, key, value, key_padding_mask=plan.padding, **options)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "fastllm" in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastllm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
