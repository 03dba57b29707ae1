"""Hugging Face transformers glue: ``attn_implementation="fastllm"`` runs ``fastllm.kernels.attention``.

Importing this module registers the implementation (``register()`` is idempotent)::

    import fastllm.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastllm")

transformers (5.x) builds masks only for implementations known to its ``AttentionMaskInterface``, so
"fastllm" is registered there with the SDPA mask builder: a 4-D bool mask (True = attend), or None
where SDPA would rely on ``is_causal``. The attention function does not apply that mask element by
element. It rebuilds the mask from what the kernel can express (causal from the module, the sliding
window from the layer, a key padding vector read off the mask), checks that the rebuild equals the
mask it was given, and raises a ValueError when it does not (packed-sequence masks, custom
or_mask/and_mask patterns, additive biases), so a model never silently gets a different mask.

Query rows that see no key at all (e.g. left padding under a causal mask) output zeros here, where
eager attention outputs an average over all keys; those rows are padding and are ignored downstream.
"""

from __future__ import annotations

import torch

from fastllm import reference
from fastllm.kernels.attention import attention

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
    from ``sliding_window`` (else ``module.sliding_window``), softcap and scaling from the layer.
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
    padding = None

    if attention_mask is None:
        # Same reading of a missing mask as SDPA: causal only for more than one query; a longer key cache
        # without a mask only happens for an empty static cache, whose keys past the queries are unused.
        causal = causal and q_len > 1
        if causal and key.shape[2] > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    else:
        if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, key.shape[2]):
            raise ValueError(
                f"attention_mask: expected shape (B, 1, {q_len}, {key.shape[2]}), got {tuple(attention_mask.shape)}"
            )
        allowed = _bool_mask(attention_mask)
        if allowed.shape[1] != 1:
            if not bool((allowed == allowed[:, :1]).all()):
                raise ValueError("attention_mask: fastllm attention needs the same mask for every head")
            allowed = allowed[:, :1]
        allowed = allowed.expand(batch, 1, q_len, key.shape[2])
        # Keys nobody sees at the end (unfilled static-cache slots) are dropped, so that the kernel's
        # bottom-right causal alignment lines up with the last real key.
        seen = allowed.any(dim=(0, 1, 2)).nonzero()
        k_len = int(seen[-1]) + 1 if seen.numel() else 1
        allowed = allowed[..., :k_len]
        key, value = key[:, :, :k_len], value[:, :, :k_len]
        padding = allowed.any(dim=2)[:, 0]  # (B, Sk): a key some query sees is not padding
        rebuilt = reference.attention_visibility(
            q_len, k_len, causal=causal, window=window, key_padding_mask=padding, device=query.device
        )
        if not torch.equal(rebuilt.expand_as(allowed), allowed):
            raise ValueError(
                f"attention_mask: fastllm attention expresses a mask as causal={causal}, sliding_window="
                f"{sliding_window} and a key padding vector; this mask has another pattern (packed sequences, "
                "a custom mask function or a prefix-LM mask?). Use attn_implementation='sdpa' for it"
            )
        if bool(padding.all()):
            padding = None

    out = attention(
        query, key, value, causal=causal, scale=scaling, key_padding_mask=padding, window=window, softcap=softcap
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "fastllm" in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastllm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
