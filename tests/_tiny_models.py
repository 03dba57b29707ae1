"""Tiny random-init transformers models (hidden 64, 2 layers) shared by the nn/ tests; no downloads."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1  # LLaVA's image placeholder id
IMAGE_SIZE, PATCH = 32, 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

ARCHS = ("bert", "llama", "gpt2", "gemma2", "llava")


def _llama_config() -> T.LlamaConfig:
    return T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 model in eval mode, built from ``seed``."""
    torch.manual_seed(seed)
    if arch == "bert":
        config = T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        model = T.BertForMaskedLM(config)
    elif arch == "llama":
        model = T.LlamaForCausalLM(_llama_config())
    elif arch == "gpt2":
        config = T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = T.GPT2LMHeadModel(config)
    elif arch == "gemma2":
        config = T.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            sliding_window=8,
        )
        model = T.Gemma2ForCausalLM(config)
    elif arch == "llava":
        vision = T.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=32,
        )
        config = T.LlavaConfig(vision_config=vision, text_config=_llama_config(), image_token_index=IMAGE_TOKEN)
        model = T.LlavaForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return model.eval()


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
