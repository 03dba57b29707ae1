"""Fused attention: fastllm vs PyTorch SDPA backends, FlexAttention and flash-attn.

Kernel cases (CUDA only): layout (B, H, S, D) bf16; grouped-query cases have fewer key/value heads.
Figures are TFLOP/s over the visible (query, key) pairs only: forward = 4 * D * Hq * pairs (QK^T and
PV), forward+backward = 3.5 x forward (the backward does 5 matmuls to the forward's 2). Pairs:
S^2 without a mask, S(S+1)/2 causal, sum_i min(i+1, w) for a causal window of w keys,
S * valid_keys per sequence with a key padding mask.

fastllm rows also carry ``rel_err``: the largest ||out - ref|| / ||ref|| over the output (and, for
fwd+bwd, dq, dk, dv) against ``fastllm.reference.attention`` computed in fp32 on the same inputs, so a
fast wrong kernel shows.

Also on CPU (where fastllm runs PyTorch's fused CPU attention inside its op):
- ``decode``: one query row per sequence against a long bf16 KV cache (GQA), fastllm (the split-KV decode
  kernel on CUDA) vs SDPA. Figure: GB/s of key/value cache read.
- ``llama-step``: one training step (forward, loss, backward) of a random-init 4-layer Llama (hidden 512,
  8 query / 2 key-value heads, MLP 1536, vocabulary 8192) on 2 x 1024 bf16 tokens with
  ``attn_implementation`` = "fastllm" vs "sdpa" vs "eager". Figure: tokens / s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, Settings, Skip, randn, rel_err, require, require_attr

PROVIDERS = ("fastllm", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "flash-attn")
CPU_REASON = "attention kernel timing needs CUDA (on CPU fastllm runs PyTorch's fused attention: decode, llama-step)"


@dataclass(frozen=True)
class Problem:
    """One attention workload. ``window``: keys visible to a query, itself included (causal); 0 = unbounded."""

    name: str
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    causal: bool = False
    padding: bool = False
    window: int = 0
    softcap: float = 0.0

    def lengths(self, device: torch.device) -> torch.Tensor:
        """Valid keys per sequence (padding cases: evenly spread from S/2 to S), int64 (B,)."""
        if not self.padding:
            return torch.full((self.batch,), self.seq, device=device)
        return torch.linspace(self.seq // 2, self.seq, self.batch, device=device).round().long()

    def pairs(self) -> int:
        """Visible (query, key) pairs summed over the batch."""
        s = self.seq
        if self.padding:
            return s * int(self.lengths(torch.device("cpu")).sum())
        if not self.causal:
            return self.batch * s * s
        w = self.window or s
        per_seq = w * (w + 1) // 2 + (s - w) * w if w < s else s * (s + 1) // 2
        return self.batch * per_seq

    def flops(self, backward: bool) -> float:
        forward = 4 * self.head_dim * self.heads * self.pairs()
        return 3.5 * forward if backward else forward

    def shape(self) -> dict[str, int]:
        out = {"B": self.batch, "Hq": self.heads, "Hkv": self.kv_heads, "S": self.seq, "D": self.head_dim}
        if self.window:
            out["window"] = self.window
        return out


def problems(settings: Settings) -> list[tuple[Problem, tuple[str, ...]]]:
    """(problem, ops) pairs to time."""
    llama = Problem("causal-gqa", 2, 32, 8, 4096, 128, causal=True)
    bert = Problem("padding", 16, 12, 12, 512, 64, padding=True)
    gemma = Problem("window-softcap", 1, 16, 8, 8192, 256, causal=True, window=4096, softcap=50.0)
    if settings.quick:
        return [(llama, ("fwd", "fwd+bwd")), (bert, ("fwd",)), (gemma, ("fwd",))]
    dense = Problem("no-mask", 4, 16, 16, 2048, 128)
    window = Problem("window", 1, 16, 8, 8192, 128, causal=True, window=4096)
    both = ("fwd", "fwd+bwd")
    return [(llama, both), (dense, both), (bert, both), (window, both), (gemma, both)]


def _inputs(p: Problem, device: torch.device, layout_bshd: bool = False):
    def make(heads: int, seed: int) -> torch.Tensor:
        t = randn((p.batch, heads, p.seq, p.head_dim), torch.bfloat16, device, seed)
        return t.transpose(1, 2).contiguous() if layout_bshd else t

    return make(p.heads, 1), make(p.kv_heads, 2), make(p.kv_heads, 3)


def _fastllm_options(p: Problem, device: torch.device) -> dict:
    """fastllm's (and the reference's) keyword arguments for problem ``p``."""
    mask = torch.arange(p.seq, device=device)[None, :] < p.lengths(device)[:, None] if p.padding else None
    window = (p.window - 1, 0) if p.window else None
    return dict(causal=p.causal, key_padding_mask=mask, window=window, softcap=p.softcap or None)


def _fastllm(p: Problem, device: torch.device):
    attention = require_attr("fastllm.kernels.attention", "attention")
    options = _fastllm_options(p, device)
    return _inputs(p, device), lambda q, k, v: attention(q, k, v, **options)


def _fastllm_rel_err(p: Problem, op: str, fn, q, k, v, grad) -> float:
    """fastllm against ``fastllm.reference.attention`` in fp32 on the same inputs: the largest rel err over the
    output and, for fwd+bwd, the gradients of q, k and v."""
    reference_attention = require_attr("fastllm.reference", "attention")
    backward = op == "fwd+bwd"
    ours = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    theirs = [t.detach().float().requires_grad_(backward) for t in (q, k, v)]
    out = fn(*ours)
    ref, _ = reference_attention(*theirs, **_fastllm_options(p, q.device), dtype=torch.float32)
    pairs = [(out, ref)]
    if backward:
        out.backward(grad)
        ref.backward(grad.float())
        pairs += [(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True)]
    err = max(rel_err(a, b) for a, b in pairs)
    del ours, theirs, out, ref, pairs
    torch.cuda.empty_cache()
    return err


def _sdpa(p: Problem, device: torch.device, backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if p.softcap:
        raise Skip("SDPA has no logit softcap")
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(
        backend_name, SDPBackend.EFFICIENT_ATTENTION
    )
    q, k, v = _inputs(p, device)
    mask = None
    if p.padding:
        mask = (torch.arange(p.seq, device=device)[None, :] < p.lengths(device)[:, None])[:, None, None, :]
    elif p.window:
        i = torch.arange(p.seq, device=device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - p.window)
    causal = p.causal and mask is None

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

    return (q, k, v), fn


def _flex(p: Problem, device: torch.device):
    flex = require("torch.nn.attention.flex_attention", "FlexAttention")
    q, k, v = _inputs(p, device)
    lengths = p.lengths(device)

    def mask_mod(b, h, qi, ki):
        keep = ki < lengths[b] if p.padding else ki >= 0
        if p.causal:
            keep = keep & (ki <= qi)
        if p.window:
            keep = keep & (ki > qi - p.window)
        return keep

    masked = p.padding or p.causal or p.window
    block_mask = flex.create_block_mask(mask_mod, p.batch, None, p.seq, p.seq, device=device) if masked else None
    score_mod = None
    if p.softcap:
        cap = p.softcap

        def score_mod(score, b, h, qi, ki):
            return cap * torch.tanh(score / cap)

    # Every case compiles its own masks / score_mod: lift dynamo's recompile limit (8) so none falls back to eager.
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    compiled = torch.compile(flex.flex_attention, dynamic=False)
    return (q, k, v), lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def _flash_attn(p: Problem, device: torch.device):
    flash_attn = require("flash_attn", "flash-attn")
    if p.padding:
        raise Skip("flash-attn takes padding through its varlen API; not benchmarked")
    q, k, v = _inputs(p, device, layout_bshd=True)
    window = (p.window - 1, 0) if p.window else (-1, -1)
    return (q, k, v), lambda q, k, v: flash_attn.flash_attn_func(
        q, k, v, causal=p.causal, window_size=window, softcap=p.softcap
    )


def _setup(p: Problem, op: str, provider: str, device: torch.device):
    if provider == "fastllm":
        (q, k, v), fn = _fastllm(p, device)
    elif provider.startswith("sdpa-"):
        (q, k, v), fn = _sdpa(p, device, provider.removeprefix("sdpa-"))
    elif provider == "flex":
        (q, k, v), fn = _flex(p, device)
    else:
        (q, k, v), fn = _flash_attn(p, device)
    if op == "fwd+bwd":
        for t in (q, k, v):
            t.requires_grad_(True)
    grad = torch.randn_like(q)

    def call():
        out = fn(q, k, v)
        if op == "fwd+bwd":
            for t in (q, k, v):
                t.grad = None
            out.backward(grad)

    try:
        call()  # compiles / autotunes, and finds out whether a forced SDPA backend takes this case
    except RuntimeError as exc:
        if provider.startswith("sdpa-") and ("No available kernel" in str(exc) or "No viable backend" in str(exc)):
            raise Skip(f"{provider} does not support this case") from exc
        raise
    if provider == "fastllm":
        return call, {"rel_err": _fastllm_rel_err(p, op, fn, q, k, v, grad)}
    return call


@dataclass(frozen=True)
class Decode:
    """One decoding step's attention: Sq = 1 query row per sequence against a cache of ``cache`` keys."""

    batch: int
    heads: int
    kv_heads: int
    cache: int
    head_dim: int

    def cache_bytes(self) -> int:
        """Bytes of keys and values read (bf16)."""
        return 2 * 2 * self.batch * self.kv_heads * self.cache * self.head_dim

    def shape(self) -> dict[str, int]:
        return {"B": self.batch, "Hq": self.heads, "Hkv": self.kv_heads, "Sq": 1, "Sk": self.cache, "D": self.head_dim}


def _decode_setup(p: Decode, provider: str, device: torch.device):
    q = randn((p.batch, p.heads, 1, p.head_dim), torch.bfloat16, device, 1)
    k, v = (randn((p.batch, p.kv_heads, p.cache, p.head_dim), torch.bfloat16, device, s) for s in (2, 3))
    if provider == "fastllm":
        attention = require_attr("fastllm.kernels.attention", "attention")
        fn = lambda: attention(q, k, v, causal=True)  # noqa: E731
        # One row sees the whole cache: SDPA in fp32 without a mask is the oracle.
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        return fn, {"rel_err": rel_err(fn(), ref)}
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


LLAMA_STEP_PROVIDERS = ("fastllm", "sdpa", "eager")


def _llama(settings: Settings, attn_implementation: str):
    """The small Llama of the module docstring (fewer layers and tokens when tiny), seeded, and its batch."""
    transformers = require("transformers")
    if attn_implementation == "fastllm":
        require("fastllm.integrations.transformers")  # registers "fastllm"
    layers, batch, tokens = (2, 1, 128) if settings.tiny else (4, 2, 1024)
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=8192, max_position_embeddings=tokens, attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    return model, ids.to(settings.device)


def _llama_step_setup(settings: Settings, attn_implementation: str):
    """A training step (forward with labels, backward) of :func:`_llama`; fastllm's also reports the rel_err of
    its loss against the same model with eager attention."""
    model, ids = _llama(settings, attn_implementation)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    if attn_implementation != "fastllm":
        return step
    eager, _ = _llama(settings, "eager")
    with torch.no_grad():
        loss, ref = (m(input_ids=ids, labels=ids, use_cache=False).loss for m in (model, eager))
    return step, {"rel_err": rel_err(loss, ref)}


def model_cases(settings: Settings) -> list[Case]:
    """The decode and Llama-step cases (CPU and CUDA)."""
    out = []
    decode = Decode(1 if settings.tiny else 4, 32, 8, 512 if settings.tiny else 8192, 128)
    for provider in ("fastllm", "sdpa"):
        out.append(Case(
            "attention", "decode", decode.shape(), "bfloat16", provider, "GB/s", decode.cache_bytes(),
            lambda p=provider: _decode_setup(decode, p, settings.device),
        ))  # fmt: skip
    shape = {"layers": 2 if settings.tiny else 4, "hidden": 512, "Hq": 8, "Hkv": 2}
    shape.update(B=1, S=128) if settings.tiny else shape.update(B=2, S=1024)
    for provider in LLAMA_STEP_PROVIDERS:
        out.append(Case(
            "attention", "llama-step", shape, "bfloat16", provider, "tokens/s", shape["B"] * shape["S"],
            lambda p=provider: _llama_step_setup(settings, p),
        ))  # fmt: skip
    return out


def _cpu_skip():
    raise Skip(CPU_REASON)


def cases(settings: Settings) -> list[Case]:
    out = model_cases(settings)
    if not settings.cuda:  # one row saying why the kernel cases are not timed here
        return [*out, Case("attention", "kernels", {}, "bfloat16", "fastllm", "TFLOP/s", 0.0, _cpu_skip)]
    for p, ops in problems(settings):
        for op in ops:
            for provider in PROVIDERS:

                def setup(p=p, op=op, provider=provider):
                    return _setup(p, op, provider, settings.device)

                flops = p.flops(backward=op == "fwd+bwd")
                out.append(
                    Case("attention", f"{p.name} {op}", p.shape(), "bfloat16", provider, "TFLOP/s", flops, setup)
                )
    return out
