"""Whole-model QLoRA training steps, and the loss alone: fastllm vs PEFT over bitsandbytes and PEFT over dense bf16.

- ``llama train-step``: one full training step (forward with labels, backward, AdamW step) of a Llama-architecture
  causal LM in bf16, LoRA r=16 / alpha=16 on all seven projections, the same random-init weights and the same
  batch for every provider. CPU: hidden 1024, MLP 2816, 4 layers, 16/4 heads, vocab 32000, 1 x 1024 tokens
  (quick: 2 layers, 256 tokens; the record's shape says which). CUDA: Llama-3-8B (hidden 4096, MLP 14336,
  32 layers, 32/8 heads, vocab 128256) at 1 x 8192 tokens.
  Providers: ``fastllm`` (prepare_qlora: NF4 + LoRA, attn_implementation="fastllm", use_fused_loss),
  ``peft+bnb`` (bitsandbytes NF4 Linear4bit + PEFT LoRA, SDPA), ``peft-bf16`` (dense bf16 + PEFT LoRA, SDPA), and
  on CUDA ``liger+peft+bnb`` (Liger-Kernel's Llama patches incl. its fused linear cross-entropy, over peft+bnb).
- ``loss fwd+bwd``: T=4096 tokens, V=32000, H=1024 (bf16 on CUDA, fp32 on the CPU), gradient to the hidden states
  (a frozen head, as in QLoRA): ``fastllm`` = ``linear_cross_entropy`` vs ``torch`` =
  ``F.cross_entropy((hidden @ W.T).float())`` (quick: T=1024).

Figures: tokens/s; ``extra.loss`` (each provider's loss on the same batch before any update; every other row's
``extra.loss_rel_diff_vs_fastllm``, flagged by ``extra.loss_disagrees`` above 1e-2);
peak memory: CUDA ``peak_mem_GiB`` (``torch.cuda.max_memory_allocated`` of a step, weights included); CPU
``extra.rss_growth_MiB``, the growth of the resident set during one warm step, measured in a fresh subprocess per
provider (``python -m benchmarks.suite_model``) with glibc's mmap threshold lowered so that freed tensors leave
the resident set (else the allocator keeps the previous step's memory and the growth reads ~0): RSS before the step
(after a warm-up step), ``/proc/self/clear_refs`` = 5 to reset the peak, then the peak ``VmHWM`` after it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness import Case, Settings, Skip, require, seeded

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROVIDERS = ("fastllm", "peft+bnb", "peft-bf16")
CUDA_PROVIDERS = (*PROVIDERS, "liger+peft+bnb")
LOSS_PROVIDERS = ("fastllm", "torch")

CPU_DIMS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000)  # fmt: skip
GPU_DIMS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)  # fmt: skip
TINY_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)  # fmt: skip
# Relative loss difference above which a provider's loss is flagged as disagreeing (a fast wrong step is no result).
LOSS_AGREEMENT = 1e-2
REPO = Path(__file__).resolve().parent.parent


def model_shape(settings: Settings) -> tuple[dict[str, int], int]:
    """(config dims, tokens) of the train-step case for this run."""
    if settings.tiny:
        return TINY_DIMS, 64
    if settings.cuda:
        return GPU_DIMS, 8192
    if settings.quick:  # a CPU step of the full shape takes tens of seconds; quick keeps the vocabulary
        return {**CPU_DIMS, "num_hidden_layers": 2}, 256
    return CPU_DIMS, 1024


def loss_shape(settings: Settings) -> dict[str, int]:
    if settings.tiny:
        return {"T": 128, "V": 1000, "H": 128}
    return {"T": 1024 if settings.quick and not settings.cuda else 4096, "V": 32000, "H": 1024}


# ---- the training step -------------------------------------------------------------------------------------------


def build_model(provider: str, dims: dict[str, int], tokens: int, device: torch.device) -> torch.nn.Module:
    """The random-init bf16 Llama (seed 0) with LoRA r=16 on all projections, the way ``provider`` trains it."""
    transformers = require("transformers")
    from benchmarks.suite_qlora import _adapt

    attn = "sdpa"
    if provider == "fastllm":
        require("fastllm.integrations.transformers")
        attn = "fastllm"
    if provider.startswith("liger"):
        liger = require("liger_kernel.transformers", "liger-kernel")
        liger.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    config = transformers.LlamaConfig(**dims, max_position_embeddings=tokens, attn_implementation=attn)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (an 8B model never exists in fp32)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = _adapt(model, "peft+bnb" if provider.startswith("liger") else provider, LLAMA_TARGETS, 16)
    if provider == "fastllm":
        from fastllm.integrations.loss import use_fused_loss

        use_fused_loss(model)
    model.train()
    return model


def make_batch(vocab: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, tokens), generator=seeded(1, device), device=device)
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """fn() = one training step (forward with labels, backward, AdamW step, grads cleared)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def first_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The loss of the untouched model on the batch (every provider starts from the same weights, LoRA B = 0)."""
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


# ---- the loss alone ----------------------------------------------------------------------------------------------


def loss_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on the CPU, whose bf16 matmuls run at a third of its fp32 speed (no AMX / avx512_bf16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def loss_inputs(shape: dict[str, int], device: torch.device):
    t, v, h = shape["T"], shape["V"], shape["H"]
    dtype = loss_dtype(device)
    hidden = torch.randn(t, h, generator=seeded(2, device), device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=seeded(3, device), device=device) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (t,), generator=seeded(4, device), device=device)
    return hidden, weight, labels


def loss_fn(provider: str):
    if provider == "fastllm":
        from fastllm.kernels import linear_cross_entropy

        return linear_cross_entropy
    return lambda hidden, weight, labels: torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels)


def loss_step(provider: str, shape: dict[str, int], device: torch.device):
    hidden, weight, labels = loss_inputs(shape, device)
    fn = loss_fn(provider)

    def step():
        hidden.grad = None
        fn(hidden, weight, labels).backward()

    return step, lambda: float(fn(hidden.detach(), weight, labels))


# ---- CPU memory in a fresh process -------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_growth_mib(step) -> float:
    """Peak resident-set growth of one call of ``step`` in this process, MiB (Linux)."""
    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    step()
    return (_rss_kib("VmHWM") - before) / 1024


def worker(spec: dict) -> dict:
    """Build the case's inputs, run one warm-up step, then measure one step's RSS growth; also its first loss."""
    device = torch.device("cpu")
    if spec["kind"] == "train":
        model = build_model(spec["provider"], spec["dims"], spec["tokens"], device)
        batch = make_batch(spec["dims"]["vocab_size"], spec["tokens"], device)
        loss = first_loss(model, batch)
        step = train_step(model, batch)
    else:
        step, loss_of = loss_step(spec["provider"], spec["shape"], device)
        loss = loss_of()
    step()
    return {"rss_growth_MiB": round(rss_growth_mib(step), 1), "loss": loss}


def measure_in_subprocess(spec: dict) -> dict:
    """Run :func:`worker` in a fresh Python (CPU, mmap threshold 128 KiB so freed tensors return to the OS)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite_model", json.dumps(spec)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- cases -------------------------------------------------------------------------------------------------------


class _Losses:
    """Each provider's loss as its case is set up. fastllm's row comes first; every later row of the case records
    its relative difference to fastllm's loss (``loss_rel_diff_vs_fastllm``) and ``loss_disagrees`` above 1e-2."""

    def __init__(self):
        self.fastllm: float | None = None

    def add(self, provider: str, loss: float, extra: dict) -> None:
        extra["loss"] = loss
        if provider == "fastllm":
            self.fastllm = loss
        elif self.fastllm is not None:
            diff = abs(self.fastllm - loss) / abs(loss)
            extra["loss_rel_diff_vs_fastllm"] = diff
            extra["loss_disagrees"] = diff > LOSS_AGREEMENT


def _train_setup(provider: str, settings: Settings, losses: _Losses):
    dims, tokens = model_shape(settings)
    if provider.startswith("liger") and not settings.cuda:
        raise Skip("the Liger-Kernel provider runs on CUDA only")
    extra: dict = {}
    if not settings.cuda:
        spec = {"kind": "train", "provider": provider, "dims": dims, "tokens": tokens}
        extra.update(measure_in_subprocess(spec))
    model = build_model(provider, dims, tokens, settings.device)
    batch = make_batch(dims["vocab_size"], tokens, settings.device)
    losses.add(provider, first_loss(model, batch), extra)
    return train_step(model, batch), extra


def _loss_setup(provider: str, settings: Settings, losses: _Losses):
    shape = loss_shape(settings)
    extra: dict = {}
    if not settings.cuda:
        extra.update(measure_in_subprocess({"kind": "loss", "provider": provider, "shape": shape}))
    step, loss_of = loss_step(provider, shape, settings.device)
    losses.add(provider, loss_of(), extra)
    return step, extra


def cases(settings: Settings) -> list[Case]:
    dims, tokens = model_shape(settings)
    shape = {"T": tokens, "hidden": dims["hidden_size"], "layers": dims["num_hidden_layers"],
             "vocab": dims["vocab_size"], "r": 16}  # fmt: skip
    train_losses, loss_losses = _Losses(), _Losses()
    out = []
    for provider in CUDA_PROVIDERS if settings.cuda else (*PROVIDERS, "liger+peft+bnb"):

        def setup(provider=provider):
            return _train_setup(provider, settings, train_losses)

        out.append(Case("model", "llama train-step", shape, "bfloat16", provider, "tokens/s", tokens, setup, True))
    lshape = loss_shape(settings)
    for provider in LOSS_PROVIDERS:

        def setup(provider=provider):
            return _loss_setup(provider, settings, loss_losses)

        dtype = str(loss_dtype(settings.device)).removeprefix("torch.")
        out.append(Case("model", "loss fwd+bwd", lshape, dtype, provider, "tokens/s", lshape["T"], setup, True))
    return out


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
