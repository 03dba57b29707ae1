"""QLoRA training steps: fastllm vs PEFT over bitsandbytes NF4 and PEFT over a dense bf16 weight.

Each provider runs forward + backward (to the input and the LoRA matrices; base weights frozen),
as they come out of the box (fastllm keeps A/B in fp32 and multiplies in the compute dtype;
PEFT computes the LoRA branch in fp32). Figure: tokens / s. fastllm's ``lora-layer`` rows also carry
``rel_err``: the largest ||out - ref|| / ||ref|| over the output and the gradients of x, A and B of the
layer (a copy with random B) against ``fastllm.reference.lora_linear`` in fp64, so a fast wrong kernel shows.
Its ``llama3-8b-block`` rows carry ``rel_err`` of the block output and ``lora_grad_rel_err`` of all LoRA
gradients as one vector, against PEFT over the same block in fp32 (SDPA) holding fastllm's dequantized weights
and its A, B (B random).

- ``lora-layer``: one 4096 x 4096 linear, r=16, alpha=16, 512 bf16 tokens.
- ``llama3-8b-block`` (CUDA): one Llama-3-8B decoder layer (hidden 4096, MLP 14336, 32 query /
  8 key-value heads, SDPA attention for every provider) over 8192 tokens with LoRA on all seven
  projections; also records the peak CUDA memory of a step (torch.cuda.max_memory_allocated,
  weights included). ``fastllm+attn`` also swaps SDPA for fastllm's attention
  (``attn_implementation="fastllm"``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks.harness import Case, Settings, Skip, randn, rel_err, require, require_attr

PROVIDERS = ("fastllm", "peft+bnb", "peft-bf16")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Holder(nn.Module):
    """A one-layer model, so PEFT can target the layer by name."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _to_bnb(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Replace every nn.Linear whose name ends with one of ``names`` by a bitsandbytes NF4 Linear4bit."""
    bnb = require("bitsandbytes")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] not in names:
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=module.weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
        )
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        layer = layer.to(module.weight.device)  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


def _peft(model: nn.Module, targets: tuple[str, ...], r: int) -> nn.Module:
    peft = require("peft")
    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return peft.get_peft_model(model, config)


def _adapt(model: nn.Module, provider: str, targets: tuple[str, ...], r: int) -> nn.Module:
    """``model`` (dense bf16) with LoRA r / alpha=r on ``targets``, the way ``provider`` does it."""
    if provider == "fastllm":
        prepare_qlora = require_attr("fastllm", "prepare_qlora")
        return prepare_qlora(model, r=r, alpha=r, target_modules=list(targets), progress=False)
    if provider == "peft+bnb":
        model = _to_bnb(model, targets)
    return _peft(model, targets, r)


def _train_step(model: nn.Module, x: torch.Tensor, forward=None):
    """fn() = forward + backward of ``model`` on ``x`` (grads of x and the trainable parameters reset first).

    ``forward(model, x)`` returns the tensor to backpropagate from (default ``model(x)``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters after adding LoRA")
    x.requires_grad_(True)
    grad = None

    def step():
        nonlocal grad
        for t in [x, *params]:
            t.grad = None
        out = model(x) if forward is None else forward(model, x)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return step


def lora_layer_rel_err(layer: nn.Module, x: torch.Tensor) -> float:
    """A copy of fastllm's ``layer`` with random B against ``fastllm.reference.lora_linear`` (fp64, the dequantized
    weight): the largest rel err over the output and the gradients of x, A and B."""
    lora_linear = require_attr("fastllm.reference", "lora_linear")
    layer = copy.deepcopy(layer)
    with torch.no_grad():  # B starts at zero, which would leave the branch (and grad A) unchecked
        layer.lora_B.copy_(randn(tuple(layer.lora_B.shape), torch.float32, x.device, seed=7, scale=0.02))
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B)]
    ref = lora_linear(leaves[0], layer.base_layer.dequantize(torch.float32), None, *leaves[1:], layer.scaling)
    grad = randn(tuple(y.shape), y.dtype, x.device, seed=8)
    y.backward(grad)
    ref.backward(grad.double())
    ours = (y, x.grad, layer.lora_A.grad, layer.lora_B.grad)
    return max(rel_err(o, r) for o, r in zip(ours, (ref, *(t.grad for t in leaves)), strict=True))


def layer_setup(provider: str, tokens: int, n: int, k: int, r: int, device: torch.device):
    linear = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(randn((n, k), torch.bfloat16, device, seed=n + k, scale=0.02))
    model = _adapt(_Holder(linear), provider, ("proj",), r)
    x = randn((tokens, k), torch.bfloat16, device, seed=tokens)
    step = _train_step(model, x)
    if provider != "fastllm":
        return step
    # fastllm's first step times its two large-M NF4 paths (fastllm.ops.gemm_choice) and keeps the faster: run it
    # here, outside the timed calls, and note the choice and what it measured beside the correctness figure.
    step()
    choice = require("fastllm.ops.gemm_choice")
    chooser = choice.GPU_GEMM if device.type == "cuda" else choice.CPU_GEMM
    notes = {"rel_err": lora_layer_rel_err(model.proj, x)}
    for key, timing in chooser.timings.items():
        if key[2:4] == (n, k):
            direction = key[0]
            notes[f"{direction}_path"] = chooser.choices[key]
            notes |= {f"{direction}_{path}_ms": round(ms, 3) for path, ms in timing.items()}
    return step, notes


LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}


def block_setup(provider: str, tokens: int, device: torch.device, dims: dict[str, int] = LLAMA3_8B):
    """Training step of one Llama decoder layer (``dims``) over ``tokens`` tokens with LoRA r=16 on all projections.

    ``provider``: one of ``PROVIDERS`` or "fastllm+attn" (fastllm's linears and attention).
    """
    transformers = require("transformers")
    attn = "sdpa"
    if provider == "fastllm+attn":  # fastllm's attention kernel too, through the transformers registration
        require("fastllm.integrations.transformers")
        attn, provider = "fastllm", "fastllm"
    config = transformers.LlamaConfig(
        **dims, num_hidden_layers=1, vocab_size=256, max_position_embeddings=tokens, attn_implementation=attn
    )
    with torch.device(device):
        model = transformers.LlamaModel(config).to(torch.bfloat16)
    dense = copy.deepcopy(model) if provider == "fastllm" else None  # the reference's starting point
    model = _adapt(model, provider, LLAMA_TARGETS, 16)
    x = randn((1, tokens, dims["hidden_size"]), torch.bfloat16, device, seed=tokens)
    step = _train_step(model, x, lambda m, e: m(inputs_embeds=e, use_cache=False).last_hidden_state)
    if dense is None:
        return step
    return step, block_rel_err(model, dense, x)


def block_rel_err(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """fastllm's prepared block ``model`` (its B set random here) against PEFT over ``dense`` (the block before
    ``prepare_qlora``) in fp32 with SDPA, each targeted weight replaced by fastllm's dequantized NF4 weight and the
    same A, B: ``rel_err`` of the block output and ``lora_grad_rel_err`` of all LoRA gradients as one vector."""
    lora_linear = require_attr("fastllm", "LoraLinear")
    ours = {name: m for name, m in model.named_modules() if isinstance(m, lora_linear)}
    with torch.no_grad():
        for i, layer in enumerate(ours.values()):
            layer.lora_B.copy_(randn(tuple(layer.lora_B.shape), torch.float32, x.device, seed=100 + i, scale=0.02))
        ref = dense.float()
        for name, layer in ours.items():
            ref.get_submodule(name).weight.copy_(layer.base_layer.dequantize(torch.float32))
    ref.config._attn_implementation = "sdpa"
    ref = _peft(ref, LLAMA_TARGETS, 16)
    theirs = {name.removeprefix("base_model.model."): m for name, m in ref.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, layer in ours.items():
            theirs[name].lora_A["default"].weight.copy_(layer.lora_A)
            theirs[name].lora_B["default"].weight.copy_(layer.lora_B)
    grad = randn(tuple(x.shape), torch.float32, x.device, seed=9)
    outs = []
    for net, inputs in ((model, x.detach()), (ref, x.detach().float())):
        out = net(inputs_embeds=inputs, use_cache=False).last_hidden_state
        out.backward(grad.to(out.dtype))
        outs.append(out.detach())

    def lora_grads(pairs) -> torch.Tensor:
        return torch.cat([g.flatten() for a, b in pairs for g in (a.grad, b.grad)])

    mine = lora_grads((m.lora_A, m.lora_B) for m in ours.values())
    want = lora_grads((theirs[n].lora_A["default"].weight, theirs[n].lora_B["default"].weight) for n in ours)
    for layer in ours.values():
        layer.lora_A.grad = layer.lora_B.grad = None
    return {"rel_err": rel_err(outs[0], outs[1]), "lora_grad_rel_err": rel_err(mine, want)}


def cases(settings: Settings) -> list[Case]:
    tokens, n, k, r = (32, 256, 320, 8) if settings.tiny else (512, 4096, 4096, 16)
    block_tokens = 8192
    out = []
    for provider in PROVIDERS:

        def setup(provider=provider):
            return layer_setup(provider, tokens, n, k, r, settings.device)

        shape = {"T": tokens, "N": n, "K": k, "r": r}
        out.append(Case("qlora", "lora-layer fwd+bwd", shape, "bfloat16", provider, "tokens/s", tokens, setup))
    for provider in ("fastllm", "fastllm+attn", *PROVIDERS[1:]):

        def setup(provider=provider):
            if not settings.cuda:
                raise Skip("the Llama-3-8B block at 8k tokens needs CUDA")
            return block_setup(provider, block_tokens, settings.device)

        shape = {"T": block_tokens, "hidden": 4096, "mlp": 14336, "r": 16}
        out.append(
            Case("qlora", "llama3-8b-block fwd+bwd", shape, "bfloat16", provider, "tokens/s", block_tokens, setup, True)
        )
    return out
