"""attn_implementation="fastllm" in tiny random-init transformers models equals "eager", forward and backward."""

from __future__ import annotations

import pytest
import torch
from _metrics import rel_err
from _tiny_models import make_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastllm import reference
from fastllm.integrations import transformers as fastllm_hf

VOCAB, SEQ = 100, 12
# A wide init makes attention scores O(1..10): sharp softmaxes and a softcap that matters (at the usual 0.02
# every row would be close to uniform and a wrong mask would hardly show).
INIT = 0.3
# How these tests change the shared tiny models (tests/_tiny_models.py): narrower BERT / GPT-2 / Gemma 2,
# no dropout, and a Gemma 2 with one key/value head for two query heads, a sliding window shorter than SEQ
# on its first layer and an attention softcap that bites; LLaVA sees a 16x16 image.
OVERRIDES = {
    "bert": dict(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    "llama": {},
    "gpt2": dict(n_embd=32, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, query_pre_attn_scalar=16,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0,
    ),
    "llava": dict(image_size=16, vision_feature_layer=-1, vision_feature_select_strategy="default"),
}  # fmt: skip
PADDING_SIDE = {"bert": "right", "llama": "left", "gpt2": "right", "gemma2": "left"}


def tiny(arch: str, attn_implementation: str, **change) -> torch.nn.Module:
    """The tiny ``arch`` model of these tests (weights from seed 0, eval mode), with ``change`` to its config."""
    overrides = {"vocab_size": VOCAB, "initializer_range": INIT, **OVERRIDES[arch], **change}
    return make_model(arch, 0, attn_implementation, **overrides)


def twin_models(arch: str):
    """The same random weights with eager and with fastllm attention (fp32, eval mode)."""
    eager, fast = tiny(arch, "eager"), tiny(arch, "fastllm")
    fast.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and fast.config._attn_implementation == "fastllm"
    return eager, fast


def batch_with_padding(side: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    if side == "left":
        mask[1, :4] = 0
        mask[2, :1] = 0
    else:
        mask[1, 8:] = 0
        mask[2, 11:] = 0
    return ids, mask


def compare(eager, fast, inputs: dict, valid: torch.Tensor):
    """Logits at valid positions and all parameter gradients of a loss on them: fastllm vs eager."""
    results = []
    for model in (eager, fast):
        model.zero_grad()
        logits = model(**inputs).logits
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        (logits * weights * valid[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach()[valid.bool()], grads))
    (ref_logits, ref_grads), (logits, grads) = results
    assert rel_err(logits, ref_logits) < 1e-4
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(ref_grads)]) for g in (grads, ref_grads))
    assert torch.isfinite(flat).all()
    assert rel_err(flat, ref_flat) < 1e-4
    # per parameter, skipping gradients that are zero in exact arithmetic (e.g. key biases: softmax is shift
    # invariant) and hold only rounding noise
    significant = [n for n in ref_grads if ref_grads[n].norm() > 1e-5 * ref_flat.norm()]
    worst = max(rel_err(grads[n], ref_grads[n]) for n in significant)
    assert worst < 1e-3, max(significant, key=lambda n: rel_err(grads[n], ref_grads[n]))


def test_register_is_idempotent_and_registers_mask():
    fastllm_hf.register()
    fastllm_hf.register()
    assert AttentionInterface._global_mapping["fastllm"] is fastllm_hf.fastllm_attention_forward
    assert "fastllm" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("arch", list(PADDING_SIDE))
def test_text_model_matches_eager_with_padding(arch):
    eager, fast = twin_models(arch)
    ids, mask = batch_with_padding(PADDING_SIDE[arch])
    compare(eager, fast, dict(input_ids=ids, attention_mask=mask), mask)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_cached_generation_matches_eager(arch):
    """Greedy decoding with a KV cache (Sq = 1 against a growing / sliding cache) and left padding."""
    eager, fast = twin_models(arch)
    ids, mask = batch_with_padding("left", seed=5)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ref, got = (m.generate(input_ids=ids, attention_mask=mask, **options) for m in (eager, fast))
    assert torch.equal(got.sequences, ref.sequences)
    assert max(rel_err(a, b) for a, b in zip(got.logits, ref.logits, strict=True)) < 1e-4


def test_gemma2_window_and_softcap_are_exercised():
    """The Gemma 2 case has a window shorter than the sequence and a softcap, and both change the logits."""
    eager, fast = twin_models("gemma2")
    assert eager.config.sliding_window < SEQ and eager.config.attn_logit_softcapping is not None
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = eager(input_ids=ids).logits
        assert rel_err(fast(input_ids=ids).logits, ref) < 1e-4
        for change in (dict(sliding_window=4 * SEQ), dict(attn_logit_softcapping=None)):
            other = tiny("gemma2", "fastllm", **change)
            other.load_state_dict(eager.state_dict())
            assert rel_err(other(input_ids=ids).logits, ref) > 1e-3, change


def test_llava_matches_eager():
    eager, fast = twin_models("llava")
    ids, mask = batch_with_padding("left", seed=3)
    ids[ids == VOCAB - 1] = 1
    ids[:, 5:9] = VOCAB - 1  # 4 patches of a 16x16 image with 8x8 patches (CLS dropped)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    compare(eager, fast, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), mask)
    assert fast.config.vision_config._attn_implementation == "fastllm"


def test_packed_sequence_mask_is_refused():
    """position_ids that restart inside a row make a block-diagonal mask: refused, not silently ignored."""
    eager, fast = twin_models("llama")
    ids = torch.randint(1, VOCAB, (1, SEQ))
    position_ids = torch.cat([torch.arange(5), torch.arange(SEQ - 5)])[None]
    with pytest.raises(ValueError, match="attention_mask: fastllm attention expresses a mask"):
        fast(input_ids=ids, position_ids=position_ids, use_cache=False)


def test_dropout_in_training_is_refused():
    model = tiny("llama", "fastllm", attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=torch.randint(1, VOCAB, (1, SEQ)))


def test_attention_function_rejects_bad_masks():
    q = torch.randn(2, 2, 5, 16)
    module = torch.nn.Module()
    module.is_causal = False
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        fastllm_hf.fastllm_attention_forward(module, q, q, q, torch.ones(2, 1, 5, 4, dtype=torch.bool))
    bias = torch.randn(2, 1, 5, 5)
    with pytest.raises(ValueError, match="carries a bias"):
        fastllm_hf.fastllm_attention_forward(module, q, q, q, bias)
    per_head = torch.ones(2, 2, 5, 5, dtype=torch.bool)
    per_head[0, 1, 0, 0] = False
    with pytest.raises(ValueError, match="same mask for every head"):
        fastllm_hf.fastllm_attention_forward(module, q, q, q, per_head)


def test_attention_function_reads_bool_additive_and_static_cache_masks():
    """Direct calls: a causal + padding mask as bool or as 0/min additive, and a static-cache mask whose
    last key slots are unfilled (causal offset by the cache position) all equal the reference."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4 // n, s, 16, generator=gen) for n, s in ((1, 7), (2, 12), (2, 12)))
    module = torch.nn.Module()
    module.is_causal = True
    # cache holds 3 earlier tokens; slots 10, 11 of the static cache are still empty; sequence 1 left-padded
    pos_q = torch.arange(7) + 3
    key_ok = torch.ones(2, 12, dtype=torch.bool)
    key_ok[1, :2] = False
    bool_mask = (torch.arange(12)[None, :] <= pos_q[:, None])[None, None] & key_ok[:, None, None, :]
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    # keys 0..9 are filled: with them, causal bottom-right alignment is the cache's own causal pattern
    ref, _ = reference.attention(
        q, k[:, :, :10], v[:, :, :10], causal=True, scale=0.25, key_padding_mask=key_ok[:, :10]
    )
    for mask in (bool_mask, additive):
        out, weights = fastllm_hf.fastllm_attention_forward(module, q, k, v, mask, scaling=0.25)
        assert weights is None and out.shape == (2, 7, 4, 16)
        assert rel_err(out.transpose(1, 2), ref) < 1e-5
