"""Tiny random-init transformers models (2 layers, no downloads) and helpers shared by the nn/ and attention tests.

Each architecture is defined once here; a test passes what it needs to differ as config overrides
(width, init scale, dropout, sliding window, softcap, grouped-query heads, ...). Without overrides
the models are the ones the nn/ tests use: hidden 64, init 0.02, vocabulary ``VOCAB``.
"""

from __future__ import annotations

import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastllm import LoraLinear

VOCAB = 96
IMAGE_SIZE, PATCH = 32, 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
IMAGE_TOKEN = VOCAB - 1  # LLaVA's image placeholder id (the last id of the vocabulary)

ARCHS = ("bert", "llama", "gpt2", "gemma2", "llava")
MODEL_CLASSES: dict[str, type[T.PreTrainedModel]] = {
    "bert": T.BertForMaskedLM,
    "llama": T.LlamaForCausalLM,
    "gpt2": T.GPT2LMHeadModel,
    "gemma2": T.Gemma2ForCausalLM,
    "llava": T.LlavaForConditionalGeneration,
}


# Hidden 64, 2 layers, 4 heads; the decoders share each key/value head between 2 query heads (GQA).
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_DECODER = {**_TEXT, "num_key_value_heads": 2, "head_dim": 16}
_TEXT_CONFIGS: dict[str, tuple[type[T.PretrainedConfig], dict]] = {
    "bert": (T.BertConfig, _TEXT),
    "llama": (T.LlamaConfig, _DECODER),
    "gpt2": (
        T.GPT2Config,
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    "gemma2": (T.Gemma2Config, {**_DECODER, "sliding_window": 8}),
}


def _llava(
    vocab_size: int = VOCAB, initializer_range: float = 0.02, image_size: int = IMAGE_SIZE, **overrides
) -> T.LlavaConfig:
    """CLIP vision tower + the tiny Llama; ``vocab_size`` and ``initializer_range`` apply to both towers and the
    image placeholder is the last id of the vocabulary."""
    vision = T.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=32,
        initializer_range=initializer_range,
    )
    text = tiny_config("llama", vocab_size=vocab_size, initializer_range=initializer_range)
    return T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1, **overrides)


def tiny_config(arch: str, **overrides) -> T.PretrainedConfig:
    """The config of the tiny ``arch`` model with ``overrides`` (transformers config keyword arguments;
    for LLaVA ``vocab_size``, ``initializer_range`` and ``image_size`` reach the towers, the rest the LlavaConfig)."""
    if arch == "llava":
        return _llava(**overrides)
    if arch not in _TEXT_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}, expected one of {ARCHS}")
    config_class, base = _TEXT_CONFIGS[arch]
    return config_class(**{**base, **overrides})


def make_model(arch: str, seed: int = 0, attn_implementation: str | None = None, **overrides) -> torch.nn.Module:
    """A tiny fp32 model in eval mode, its weights drawn from ``seed``.

    ``attn_implementation`` None keeps transformers' default; ``overrides`` go to :func:`tiny_config`.
    """
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    cls = MODEL_CLASSES[arch]
    return cls._from_config(config, attn_implementation=attn_implementation).eval()


def make_batch(arch: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs (with labels) for ``make_model(arch)``; LLaVA gets one image per sequence (16 more tokens)."""
    g = torch.Generator().manual_seed(seed)
    seq += N_IMAGE_TOKENS if arch == "llava" else 0
    ids = torch.randint(1, VOCAB - 1, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "bert":
        out["attention_mask"][1, -5:] = 0  # padding mask on the second sequence
    if arch == "llava":
        ids[:, 1 : 1 + N_IMAGE_TOKENS] = IMAGE_TOKEN
        out["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    out["labels"] = ids.clone()
    return out


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch`` (its labels left out), without autograd."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def with_dequantized_weights(dense: nn.Module, prepared: nn.Module) -> nn.Module:
    """``dense`` (the model as it was before ``prepare_qlora``) with the weight of every layer that ``prepared``
    adapts set to that layer's dequantized NF4 weight, in place."""
    for name, module in prepared.named_modules():
        if isinstance(module, LoraLinear):
            weight = module.base_layer.dequantize(torch.float32)
            target = dense.get_submodule(name)
            target.weight.data = weight.t().contiguous() if isinstance(target, Conv1D) else weight
    return dense


def bnb_linear4bit(linear: nn.Linear, double_quant: bool = True) -> nn.Module:
    """A bitsandbytes Linear4bit (nf4, uint8 storage) holding ``linear``'s weight and bias, quantized on the CPU."""
    import bitsandbytes as bnb  # only the tests that compare with bitsandbytes pay for its import

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        quant_type="nf4",
        compress_statistics=double_quant,
        quant_storage=torch.uint8,
    )
    layer.weight.data = linear.weight.detach().clone()  # keeps the dtype (bf16 stays bf16)
    if linear.bias is not None:
        layer.bias.data = linear.bias.detach().clone()
    return layer.to("cpu")  # bitsandbytes quantizes when the layer moves to a device
