"""attn_implementation="fastllm" in tiny random-init transformers models equals "eager", forward and backward."""

from __future__ import annotations

import pytest
import torch
from _metrics import rel_err
from _tiny_models import make_model
from _triton_compile import python_without_interpreter
from transformers import AttentionInterface, DataCollatorWithFlattening
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


LENGTHS = (5, 3, 7)  # three packed sequences; Gemma 2's window (4) is shorter than two of them


def packed_batch(with_offsets: bool) -> dict:
    """Three random sequences of LENGTHS flattened into one row by transformers' DataCollatorWithFlattening
    (position_ids restart at 0 per sequence; ``with_offsets`` adds the cu_seq_lens_q/k keyword arguments)."""
    gen = torch.Generator().manual_seed(7)
    features = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=gen).tolist()} for n in LENGTHS]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=with_offsets)(features)
    batch.pop("labels")
    assert batch["position_ids"].tolist() == [[i for n in LENGTHS for i in range(n)]]
    return dict(batch, use_cache=False)


@pytest.mark.parametrize("with_offsets", [False, True], ids=["mask", "cu_seq_lens"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_sequences_match_separate_sequences(arch, with_offsets):
    """A packed row equals each sequence run on its own with eager attention (forward), and its gradients equal
    eager attention under transformers' block-diagonal packed mask (backward)."""
    eager, fast = twin_models(arch)
    batch = packed_batch(with_offsets)
    with torch.no_grad():
        got = fast(**batch).logits[0]
        pieces = batch["input_ids"][0].split(LENGTHS)
        ref = torch.cat([eager(input_ids=piece[None], use_cache=False).logits[0] for piece in pieces])
    assert rel_err(got, ref) < 1e-4
    # the sequences are really kept apart: running the row as one sequence gives other logits
    with torch.no_grad():
        assert rel_err(fast(input_ids=batch["input_ids"], use_cache=False).logits[0], ref) > 1e-3
    compare(eager, fast, batch, torch.ones_like(batch["input_ids"]))


def segment_reference(q, k, v, bounds: list[list[int]], **options) -> torch.Tensor:
    """reference.attention on every segment [start, end) of every row separately, (B, H, S, D) -> (B, S, H, D)."""
    rows = []
    for b, row in enumerate(bounds):
        parts = [reference.attention(*(t[b : b + 1, :, s:e] for t in (q, k, v)), **options)[0] for s, e in row]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).to(q.dtype)


def block_mask(bounds: list[list[int]], seq: int, causal: bool, window: tuple[int, int] | None = None) -> torch.Tensor:
    """The bool (B, 1, S, S) mask of the blocks [start, end) of each row, causal and windowed as a sequence."""
    mask = torch.zeros(len(bounds), 1, seq, seq, dtype=torch.bool)
    for b, row in enumerate(bounds):
        for s, e in row:
            mask[b, 0, s:e, s:e] = True
    return mask & reference.attention_visibility(seq, seq, causal=causal, window=window)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_function_reads_block_diagonal_masks(causal):
    """Direct calls, two rows packed differently (one with a single-token block): causal blocks with a window and
    softcap, and bidirectional blocks, equal the reference run on each block; gradients too."""
    gen = torch.Generator().manual_seed(8)
    bounds = [[(0, 4), (4, 5), (5, 11)], [(0, 7), (7, 11)]]
    q, k, v = (torch.randn(2, 4 // n, 11, 16, generator=gen).requires_grad_() for n in (1, 2, 2))
    module = torch.nn.Module()
    module.is_causal = causal
    window = (2, 0) if causal else (3, 3)  # what sliding_window=3 means for a causal / bidirectional layer
    mask = block_mask(bounds, 11, causal, window)
    out, _ = fastllm_hf.fastllm_attention_forward(module, q, k, v, mask, scaling=0.3, sliding_window=3, softcap=3.0)
    ref = segment_reference(q, k, v, bounds, causal=causal, window=window, scale=0.3, softcap=3.0)
    assert rel_err(out, ref) < 1e-5
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-5


def test_inexpressible_packed_masks_are_refused():
    """Block-diagonal but bidirectional inside the blocks under a causal layer, padding inside a packed row, and
    cu_seq_lens offsets that disagree with the mask all raise instead of running another mask."""
    q = torch.randn(1, 2, 8, 16)
    module = torch.nn.Module()
    module.is_causal = True
    bounds = [[(0, 3), (3, 8)]]
    padded = block_mask(bounds, 8, causal=True)
    padded[..., 1] = False
    padded[0, 0, 1, 0] = True  # keep query 1 seeing a key
    for mask in (block_mask(bounds, 8, causal=False), padded):
        with pytest.raises(ValueError, match="attention_mask: fastllm attention expresses a mask"):
            fastllm_hf.fastllm_attention_forward(module, q, q, q, mask)
    offsets = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_mask: fastllm attention expresses a mask"):
        fastllm_hf.fastllm_attention_forward(
            module, q, q, q, block_mask(bounds, 8, causal=True), cu_seq_lens_q=offsets, cu_seq_lens_k=offsets
        )
    with pytest.raises(ValueError, match="cu_seq_lens_q: expected offsets"):
        bad = torch.tensor([0, 4, 9], dtype=torch.int32)
        fastllm_hf.fastllm_attention_forward(module, q, q, q, None, cu_seq_lens_q=bad, cu_seq_lens_k=bad)


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


def test_mask_is_read_once_per_forward(monkeypatch):
    """Every layer gets the same mask tensor: it is read (host syncs) once per distinct mask and forward, not once
    per layer; a mask changed in place, or a new mask, is read again."""
    reads = []
    real = fastllm_hf._mask_plan
    monkeypatch.setattr(fastllm_hf, "_mask_plan", lambda *args: reads.append(args[0]) or real(*args))
    model = tiny("llama", "fastllm", num_hidden_layers=3)
    ids, mask = batch_with_padding("left")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(reads) == 1 and reads[0] is not None
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 2, 6, 16)
    allowed = reference.attention_visibility(6, 6, causal=True).expand(2, 1, 6, 6).clone()
    first, _ = fastllm_hf.fastllm_attention_forward(module, q, q, q, allowed)
    assert torch.equal(fastllm_hf.fastllm_attention_forward(module, q, q, q, allowed)[0], first)
    assert len(reads) == 2
    allowed[1, 0, :, :2] = False  # padding now: must be read again and change the result
    again, _ = fastllm_hf.fastllm_attention_forward(module, q, q, q, allowed)
    assert len(reads) == 3 and not torch.equal(again[1], first[1])
    assert torch.equal(again[0], first[0])


# The model comparisons of this file, rerun in a process without TRITON_INTERPRET: there "fastllm" attention on CPU
# tensors runs the op's CPU implementation (PyTorch's fused CPU attention; the reference math under softcap).
_CPU_IMPLEMENTATION_SCRIPT = """
import test_hf_attention as t
from fastllm.kernels import _config

assert not _config.INTERPRET
for arch in t.PADDING_SIDE:
    t.test_text_model_matches_eager_with_padding(arch)
for arch in ("llama", "gemma2"):
    t.test_cached_generation_matches_eager(arch)
    for with_offsets in (False, True):
        t.test_packed_sequences_match_separate_sequences(arch, with_offsets)
t.test_llava_matches_eager()
t.test_gemma2_window_and_softcap_are_exercised()
for causal in (True, False):
    t.test_attention_function_reads_block_diagonal_masks(causal)
t.test_attention_function_reads_bool_additive_and_static_cache_masks()
print("ok")
"""


def test_cpu_implementation_matches_eager():
    """Without the interpreter (PyTorch's fused CPU attention inside the op): the same logits, gradients and greedy
    generations as eager attention, on every model of this file."""
    proc = python_without_interpreter(["-c", _CPU_IMPLEMENTATION_SCRIPT])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"
