"""Soak: a small QLoRA model trains for many steps; resident memory must stay flat and every loss finite.

    python -m benchmarks.soak                         # 2,000 steps (a few minutes on the 2-core CPU machine)
    python -m benchmarks.soak --steps 300 --out DIR   # shorter (tests/test_soak.py runs this)

One torch thread by default (--threads): on a machine shared by busy processes, OpenMP threads that wait for
each other make a step 20x slower and the timing meaningless; memory is what this measures.

A random-init Llama (hidden 128, 2 layers, vocabulary 256) goes through ``prepare_qlora`` (NF4 + LoRA on
every linear, dropout on) and trains with AdamW on a fresh random batch each step, the whole
QLoRA step each time: NF4 forward, fused LoRA backward, optimizer. The resident set size (RSS, from
/proc/self/statm) is sampled every ``--every`` steps. After the warm-up (the first ``--warmup`` steps:
allocator pools, autograd and optimizer state, lazily built tables), the RSS must stay within
``--tolerance`` (2%) of its value at the end of the warm-up: a leak of a few KiB per step shows up as a
steady climb. Writes ``soak.json`` (every sample and loss, the verdict) under ``--out`` (default
benchmarks/results/<device>/) and exits 1 when the run fails either check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the CPU C++ path, as the benchmark runner does

import torch  # noqa: E402

from benchmarks.environment import REPO, device_name  # noqa: E402


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def build_model(seed: int = 0) -> torch.nn.Module:
    """The prepared tiny Llama (random init; nothing is downloaded)."""
    import transformers as T

    from fastllm import prepare_qlora

    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = T.LlamaForCausalLM(config)
    return prepare_qlora(model, r=8, alpha=16, dropout=0.05, progress=False).train()


def soak(steps: int, warmup: int, every: int, batch: int = 4, seq: int = 64, seed: int = 0) -> dict:
    """Train ``steps`` steps; return the losses, the RSS samples and the verdict fields."""
    if not 0 < warmup < steps:
        raise ValueError(f"warmup must be in (0, steps), got warmup={warmup}, steps={steps}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    model = build_model(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    losses, samples = [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        ids = torch.randint(0, vocab, (batch, seq), generator=data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == warmup:
            samples.append((step, rss_bytes()))
    seconds = time.perf_counter() - start
    base = dict(samples)[warmup]
    after = [rss for step, rss in samples if step >= warmup]
    drift = (max(after) - min(after)) / base if base else float("nan")
    return {
        "steps": steps,
        "warmup": warmup,
        "batch": batch,
        "seq": seq,
        "seconds": seconds,
        "losses": losses,
        "all_losses_finite": all(math.isfinite(x) for x in losses),
        "rss_samples": samples,
        "rss_at_warmup_mib": base / 2**20,
        "rss_min_after_warmup_mib": min(after) / 2**20,
        "rss_max_after_warmup_mib": max(after) / 2**20,
        "rss_drift_after_warmup": drift,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="sample the RSS every N steps")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed (max - min) / RSS at warm-up end")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = soak(args.steps, args.warmup, args.every)
    result["tolerance"] = args.tolerance
    result["device"] = device_name(torch.device("cpu"))
    result["ok"] = result["all_losses_finite"] and result["rss_drift_after_warmup"] <= args.tolerance
    out = args.out or REPO / "benchmarks" / "results" / "cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    curve = ", ".join(f"{step}: {rss / 2**20:.1f}" for step, rss in result["rss_samples"])
    print(f"{result['steps']} steps in {result['seconds']:.0f} s on {result['device']}")
    first, last = result["losses"][0], result["losses"][-1]
    print(f"losses finite: {result['all_losses_finite']} (first {first:.4f}, last {last:.4f})")
    print(f"RSS MiB by step: {curve}")
    print(
        f"after warm-up: {result['rss_min_after_warmup_mib']:.1f} .. {result['rss_max_after_warmup_mib']:.1f} MiB, "
        f"drift {100 * result['rss_drift_after_warmup']:.2f}% (limit {100 * args.tolerance:.0f}%): "
        + ("ok" if result["ok"] else "FAILED")
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
