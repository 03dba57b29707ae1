"""Loading a checkpoint into a QLoRA-ready NF4 model: fastllm vs transformers + bitsandbytes vs bf16 + prepare_qlora.

The checkpoint is a synthetic bf16 Llama written once per run to a temp dir (random N(0, 0.02) weights,
safetensors shards of 200 MB as ``save_pretrained`` writes them):
- full: the issue's 0.49B model (hidden 2048, MLP 4608, 16 heads, 8 layers, vocab 32000; ~939 MiB);
- quick: the same with 2 layers (~420 MiB); tiny: hidden 256, 2 layers, vocab 1024.

Providers (each load runs in a fresh Python process, the only way to measure a peak RSS honestly):
- ``fastllm``: ``fastllm.from_pretrained(path)`` (quantize on load, tensors read one at a time);
- ``fastllm-hf`` (full mode only): ``AutoModelForCausalLM.from_pretrained(path,
  quantization_config=fastllm.NF4Config())`` (the same quantizer, transformers' own mmap reader);
- ``bnb``: transformers + bitsandbytes ``load_in_4bit`` (nf4, double quant);
- ``bf16+prepare``: ``from_pretrained(dtype=bf16)`` then ``fastllm.prepare_qlora`` (the 16-bit model whole).

Figure: GB/s of checkpoint loaded (bytes on disk / load time). Each process first loads a tiny checkpoint
(imports, lazy modules, first kernel calls), then resets ``VmHWM`` and times one load. ``extra``: the peak
RSS growth over that baseline, taken after one element of every page of every model tensor has been read
(a zero-copy mmap loader is charged for the pages it maps once they are touched, as training touches
them), the model's tensor bytes after, and the issue's targets: RSS growth <= 1.3 x the NF4 model's bytes +
the largest shard; on CUDA the peak ``torch.cuda.max_memory_allocated`` <= NF4 model bytes + the largest
tensor's 16-bit bytes + 5%.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Case, Settings, Skip, Timing, require

PROVIDERS = ("fastllm", "fastllm-hf", "bnb", "bf16+prepare")
_SHARD_BYTES = 200 * 10**6  # shard size of the synthetic checkpoint (as max_shard_size="200MB")
_REPO = Path(__file__).resolve().parent.parent

# Model sizes per mode: hidden, MLP, heads, layers, vocab.
_LLAMA_1B_WIDTH = dict(hidden_size=2048, intermediate_size=4608, num_attention_heads=16, vocab_size=32000)
_SIZES = {
    "full": dict(_LLAMA_1B_WIDTH, num_hidden_layers=8),
    "quick": dict(_LLAMA_1B_WIDTH, num_hidden_layers=2),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2, vocab_size=1024),
    "warmup": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1, vocab_size=128),
}


def _mode(settings: Settings) -> str:
    return "tiny" if settings.tiny else "quick" if settings.quick else "full"


def write_checkpoint(directory: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """A random bf16 Llama checkpoint of ``sizes`` in ``directory``, written layer by layer (never whole in memory)."""
    import transformers as T
    from safetensors.torch import save_file

    config = T.LlamaConfig(**sizes, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    with torch.device("meta"):
        skeleton = T.LlamaForCausalLM(config)
    # Plan the shards from the shapes (names in state-dict order, <= 200 MB each), then draw and write one at a time.
    plan: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, param in skeleton.state_dict().items():
        nbytes = param.numel() * 2
        if plan[-1] and size + nbytes > _SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((name, param.shape))
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {
            name: torch.ones(shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight")
            else (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            for name, shape in names
        }
        save_file(tensors, directory / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _checkpoint(mode: str) -> Path:
    # Written once per run (shared by every provider), removed at exit.
    cached = _CHECKPOINTS.get(mode)
    if cached is None:
        cached = Path(tempfile.mkdtemp(prefix=f"fastllm-load-{mode}-"))
        write_checkpoint(cached, _SIZES[mode])
        _CHECKPOINTS[mode] = cached
    return cached


_CHECKPOINTS: dict[str, Path] = {}


def _cleanup() -> None:
    for path in _CHECKPOINTS.values():
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup)


def _disk_bytes(path: Path) -> tuple[int, int, int]:
    """(checkpoint bytes, largest shard bytes, largest tensor's 16-bit bytes)."""
    shards = sorted(path.glob("*.safetensors"))
    from fastllm.loading.checkpoint import checkpoint_entries

    largest_tensor = max(math.prod(e.shape) * 2 for e in checkpoint_entries(path).values())
    sizes = [s.stat().st_size for s in shards]
    return sum(sizes), max(sizes), largest_tensor


def run_child(provider: str, path: Path, warmup_path: Path, device: str) -> dict:
    """One load in a fresh interpreter; its measurements (see :func:`_child`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite_load", provider, str(path), str(warmup_path), device],
        cwd=_REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"{provider} load failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _touch(model: torch.nn.Module) -> None:
    # Read one element per 4 KiB page of every tensor. A loader that leaves tensors memory-mapped to the
    # checkpoint (zero-copy) has pages that count in RSS only once touched, as training will touch them:
    # the peak is taken after this, so every provider is charged for the model it actually holds.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()


def _tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _load(provider: str, path: str, device_map: dict) -> torch.nn.Module:
    import transformers as T

    import fastllm

    if provider == "fastllm":
        return fastllm.from_pretrained(path, device_map=device_map)
    if provider == "fastllm-hf":
        config = fastllm.NF4Config()
        return T.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=torch.bfloat16, device_map=device_map
        )
    if provider == "bnb":
        config = T.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return T.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=torch.bfloat16, device_map=device_map
        )
    if provider == "bf16+prepare":
        model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
        return fastllm.prepare_qlora(model, r=16, progress=False)
    raise ValueError(f"unknown provider {provider!r}")


def _child(provider: str, path: str, warmup_path: str, device: str) -> dict:
    """Warm up (imports, lazy module loading, first kernel calls) on a tiny checkpoint, reset the RSS
    high-water mark, then time and measure one load of ``path``."""
    cuda = device == "cuda"
    device_map = {"": device}
    model = _load(provider, warmup_path, device_map)
    del model
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    baseline = _rss_kib("VmRSS")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = _load(provider, path, device_map)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _touch(model)
    out = {
        "seconds": seconds,
        "baseline_rss_MiB": baseline / 1024,
        "peak_rss_growth_MiB": (_rss_kib("VmHWM") - baseline) / 1024,
        "model_tensors_MiB": _tensor_bytes(model) / 2**20,
    }
    if cuda:
        out["peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _setup(provider: str, settings: Settings):
    if provider == "bnb":
        require("bitsandbytes")
    if provider in ("fastllm", "fastllm-hf"):
        require("fastllm.loading")
    path = _checkpoint(_mode(settings))
    disk, largest_shard, largest_tensor = _disk_bytes(path)
    reps = 1 if settings.quick else 3
    warmup = _checkpoint("warmup")
    runs = [run_child(provider, path, warmup, settings.device.type) for _ in range(reps)]
    times = [r["seconds"] * 1e3 for r in runs]
    last = runs[-1]
    extra = {k: round(v, 1) for k, v in last.items() if k != "seconds"}
    extra["peak_rss_growth_MiB"] = round(max(r["peak_rss_growth_MiB"] for r in runs), 1)
    extra["checkpoint_MiB"] = round(disk / 2**20, 1)
    extra["largest_shard_MiB"] = round(largest_shard / 2**20, 1)
    if provider == "fastllm":
        nf4 = last["model_tensors_MiB"]
        extra["target_rss_growth_MiB"] = round(1.3 * nf4 + largest_shard / 2**20, 1)
        extra["meets_rss_target"] = extra["peak_rss_growth_MiB"] <= extra["target_rss_growth_MiB"]
        if settings.cuda:
            extra["target_gpu_MiB"] = round(1.05 * (nf4 + largest_tensor / 2**20), 1)
            extra["meets_gpu_target"] = last["peak_gpu_MiB"] <= extra["target_gpu_MiB"]
    timing = Timing(statistics.median(times), min(times), reps, "one load per fresh process (time.perf_counter)")
    return timing, extra


def cases(settings: Settings) -> list[Case]:
    mode = _mode(settings)
    sizes = _SIZES[mode]
    shape = {"layers": sizes["num_hidden_layers"], "hidden": sizes["hidden_size"], "vocab": sizes["vocab_size"]}
    h, m, n, v = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"], sizes["vocab_size"]
    disk = 2 * (2 * v * h + n * (4 * h * h + 3 * h * m + 2 * h) + h)  # bf16 bytes of every tensor
    if settings.cuda and not torch.cuda.is_available():
        raise Skip("CUDA not available")
    out = []
    # Quick mode leaves out fastllm-hf (the same quantizer behind transformers' mmap reader) to stay short.
    for provider in PROVIDERS if mode == "full" else [p for p in PROVIDERS if p != "fastllm-hf"]:
        setup = lambda p=provider: _setup(p, settings)  # noqa: E731
        out.append(Case("load", "llama-bf16", shape, "bfloat16", provider, "GB/s", disk, setup))
    return out


if __name__ == "__main__":
    print(json.dumps(_child(*sys.argv[1:5])))
