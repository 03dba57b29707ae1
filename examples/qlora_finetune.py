"""QLoRA fine-tuning of a small Llama-style model on a text shipped with the repo (no downloads).

The model is random-init and tokenization is character-level, so this shows the mechanics (NF4
base weights, LoRA adapters, a training loop, saving the adapter), not a useful language model.
Runs on CPU in about a minute; uses CUDA when available.

    python examples/qlora_finetune.py --steps 200 --output qlora_adapter
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from fastllm import prepare_qlora, save_adapter

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", type=Path, default=Path("qlora_adapter"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # Character-level tokenizer over the corpus.
    text = CORPUS.read_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).to(device)
    # Base linears -> frozen NF4; only the LoRA matrices train (the embeddings and head stay frozen too).
    prepare_qlora(model, r=args.rank, alpha=args.rank, dropout=0.05)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    bar = tqdm(range(args.steps), desc="fine-tuning")
    start, tokens = time.perf_counter(), 0
    for _ in bar:
        offsets = torch.randint(0, len(ids) - args.seq - 1, (args.batch,))
        batch = torch.stack([ids[o : o + args.seq] for o in offsets.tolist()]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")

    save_adapter(model, args.output)
    print(f"adapter saved to {args.output}/ (adapter_model.safetensors, adapter_config.json)")

    model.eval()
    prompt = torch.tensor([[vocab.index(c) for c in "The "]], device=device)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=80, do_sample=False, pad_token_id=0)
    print("sample:", "".join(vocab[i] for i in out[0].tolist()))


if __name__ == "__main__":
    main()
