"""``memory_plan``: the memory a QLoRA fine-tune of a decoder (Llama-style) needs, item by item.

Counted for one device holding the whole model, bf16 compute, LoRA on every linear layer of the decoder
blocks (the targets of :func:`fastllm.prepare_qlora`), AdamW:

- base linear weights in NF4: per weight numel/2 code bytes + one absmax per block (a uint8 code with
  double quantization, else fp32) + with double quantization one fp32 scale per 256 blocks and an fp32 offset;
- embeddings, output head (once when tied) and norms, dense in bf16;
- LoRA A (r, in) and B (out, r) in fp32, their fp32 gradients, AdamW's two fp32 moments;
- activations for ``tokens`` tokens in bf16. Saved per decoder layer for backward: the block input, the
  normed inputs of attention and MLP, q / k / v, the attention output, gate, up, act(gate) and
  act(gate) * up (``9 h + 2 kv + 4 m`` values per token, h hidden, kv key/value width, m MLP width).
  With checkpointing only each block's input is kept, plus one block's activations recomputed in backward;
- the loss: logits and their gradient in fp32 (tokens x vocab each), as a loss over materialized logits needs;
  with ``fused_loss`` (:func:`fastllm.integrations.loss.use_fused_loss`) one token chunk's bf16 logits (their
  gradient is written in place) and the gradient of the hidden states, formed in the forward (tokens x hidden, bf16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastllm.ops.linear_cross_entropy import chunk_rows

# Llama-3-70B (meta-llama/Meta-Llama-3-70B config.json): the model the README's table is about.
LLAMA3_70B: dict[str, Any] = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)

_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class PlanRow:
    """One item of a memory plan: what, bytes, and how it is counted."""

    item: str
    nbytes: int
    note: str

    @property
    def gib(self) -> float:
        return self.nbytes / 2**30


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one weight of ``numel`` elements in NF4 (bitsandbytes layout)."""
    nblocks = -(-numel // blocksize)
    if double_quant:
        return (numel + 1) // 2 + nblocks + 4 * -(-nblocks // 256) + 4
    return (numel + 1) // 2 + 4 * nblocks


def _get(config: Mapping[str, Any] | Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def decoder_linears(config: Mapping[str, Any] | Any) -> list[tuple[int, int]]:
    """(out, in) of the seven linear layers of one Llama-style decoder block (q, k, v, o, gate, up, down)."""
    h, m = _get(config, "hidden_size"), _get(config, "intermediate_size")
    heads = _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim", h // heads)
    kv = _get(config, "num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    return [(q, h), (kv, h), (kv, h), (h, q), (m, h), (m, h), (h, m)]


def memory_plan(
    config: Mapping[str, Any] | Any,
    r: int = 16,
    tokens: int = 4096,
    checkpointing: bool = True,
    blocksize: int = 64,
    double_quant: bool = True,
    fused_loss: bool = False,
) -> list[PlanRow]:
    """The memory of a QLoRA fine-tune of the Llama-style decoder ``config`` (see the module docstring).

    Args:
        config: a transformers config or a mapping with hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, vocab_size (optional: num_key_value_heads, head_dim, tie_word_embeddings),
            e.g. :data:`LLAMA3_70B`.
        r: LoRA rank (> 0). tokens: tokens per step (batch x sequence, > 0).
        checkpointing: activation (gradient) checkpointing per decoder block.
        blocksize, double_quant: the NF4 format.
        fused_loss: the loss through ``fastllm.kernels.linear_cross_entropy`` (``use_fused_loss``), which never
            holds the whole logits.

    Returns:
        One :class:`PlanRow` per item, the last one the total.
    """
    missing = [f for f in _FIELDS if _get(config, f) is None]
    if missing:
        raise ValueError(f"config lacks {missing}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    h, m, layers = (_get(config, f) for f in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    vocab = _get(config, "vocab_size")
    linears = decoder_linears(config)
    kv = linears[1][0]
    nf4 = layers * sum(nf4_bytes(o * i, blocksize, double_quant) for o, i in linears)
    linear_params = layers * sum(o * i for o, i in linears)
    dense = (1 if _get(config, "tie_word_embeddings", False) else 2) * vocab * h + (2 * layers + 1) * h
    lora = layers * sum(r * (o + i) for o, i in linears)
    per_block = tokens * (9 * h + 2 * kv + 4 * m) * 2
    activations = layers * tokens * h * 2 + per_block if checkpointing else layers * per_block
    if fused_loss:
        chunk = min(tokens, chunk_rows(tokens, h, vocab))
        loss = PlanRow("loss: one chunk of logits (bf16) + grad of the hidden states", 2 * (chunk * vocab + tokens * h),
                       f"{chunk} x {vocab} + {tokens} x {h} (use_fused_loss)")  # fmt: skip
    else:
        loss = PlanRow("logits + their gradient (fp32)", 2 * tokens * vocab * 4, f"{tokens} x {vocab} x 2")
    rows = [
        PlanRow("base linear weights, NF4", nf4, f"{linear_params / 1e9:.2f}B weights, blocksize {blocksize}"),
        PlanRow("embeddings, head, norms (bf16)", 2 * dense, f"{dense / 1e9:.2f}B values"),
        PlanRow(f"LoRA A, B (fp32, r={r})", 4 * lora, f"{lora / 1e6:.0f}M trainable values"),
        PlanRow("LoRA gradients (fp32)", 4 * lora, ""),
        PlanRow("AdamW moments (fp32, 2 per value)", 8 * lora, ""),
        PlanRow(
            f"activations (bf16, {tokens} tokens)",
            activations,
            "block inputs + one block recomputed" if checkpointing else "every block's saved tensors",
        ),
        loss,
    ]
    rows.append(PlanRow("total", sum(row.nbytes for row in rows), ""))
    return rows


def plan_table(rows: list[PlanRow]) -> str:
    """``rows`` as a markdown table (GiB with one decimal)."""
    lines = ["| item | GiB | counted |", "|---|---:|---|"]
    for row in rows:
        name = f"**{row.item}**" if row.item == "total" else row.item
        lines.append(f"| {name} | {math.floor(row.gib * 10 + 0.5) / 10:.1f} | {row.note} |")
    return "\n".join(lines)
