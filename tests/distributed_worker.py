"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``distributed_worker.py MODE OUT.json [CHECKPOINT_DIR]``; rank 0 writes what it measured to OUT.json.

- ``train``: the same prepare_qlora'd tiny Llama trained for a few AdamW steps on rank 0 alone over the full
  batch (the single-process reference), with DDP and with FSDP2 (``fully_shard`` per decoder layer and at
  the root), each rank taking half the batch; plus what FSDP2 did to the NF4 weights.
- ``save``: for DDP and FSDP2, the uninterrupted run of STEPS steps (LoRA dropout on, so the RNG matters),
  then a second run stopped after RESUME_AT steps and checkpointed with fastllm.nn.checkpoint; full state
  dicts of the sharded model (and of unevenly sharded NF4 layers) against the unsharded ones; adapters
  saved and loaded through the distributed helpers.
- ``resume``: a fresh process with another seed and another initial model loads those checkpoints and
  trains the remaining steps.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import make_batch, make_model  # noqa: E402

from fastllm import LinearNF4, prepare_qlora  # noqa: E402
from fastllm.nn.adapters import ADAPTER_WEIGHTS, PEFT_PREFIX, lora_layers  # noqa: E402
from fastllm.nn.checkpoint import (  # noqa: E402
    full_model_state_dict,
    load_adapter_distributed,
    load_checkpoint,
    load_full_model_state_dict,
    save_adapter_distributed,
    save_checkpoint,
)

STEPS = 4  # the `train` comparison
RESUME_STEPS, RESUME_AT = 6, 3  # the `save` / `resume` runs
MODES = ("ddp", "fsdp2")


def train(model: nn.Module, batch: dict, distributed: bool) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return run_steps(model, optimizer, range(STEPS), lambda _: batch, distributed)


def run_steps(model, optimizer, steps, batch_of, distributed: bool) -> list[float]:
    losses = []
    for step in steps:
        loss = model(**batch_of(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if distributed:  # every rank holds the same number of tokens: the global loss is the mean
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def shard(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return DistributedDataParallel(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def build(mode: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = shard(prepare_qlora(make_model("llama"), r=4, alpha=8, dropout=0.2, progress=False).train(), mode)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def local_batch(step: int) -> dict:
    # A different batch every step, the same on every run; each rank takes its half.
    rank = dist.get_rank()
    full = make_batch("llama", batch=2 * dist.get_world_size(), seq=12, seed=100 + step)
    return {k: v[rank * 2 : rank * 2 + 2] for k, v in full.items()}


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole LoRA weights keyed as in the adapter file (collective)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    out = {}
    for name, layer in lora_layers(inner).items():
        for attr in ("lora_A", "lora_B"):
            t = getattr(layer, attr).detach()
            out[f"{PEFT_PREFIX}{name}.{attr}.weight"] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    return out


def mode_train(result: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False).train()
    full = make_batch("llama", batch=2 * world, seq=12)
    local = {k: v[rank * 2 : rank * 2 + 2] for k, v in full.items()}
    if rank == 0:
        result["single"] = train(copy.deepcopy(base), full, distributed=False)
    result["ddp"] = train(DistributedDataParallel(copy.deepcopy(base)), local, distributed=True)

    model = shard(copy.deepcopy(base), "fsdp2")
    nf4 = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(nf4, LinearNF4)
    weight, absmax = nf4.weight, nf4.absmax
    result["fsdp2_sharding"] = {
        "weight_is_dtensor": isinstance(weight, DTensor),
        "weight_placements_shard0": isinstance(weight, DTensor) and weight.placements == (Shard(0),),
        "weight_global_shape": list(weight.shape),
        "weight_local_shape": list(weight.to_local().shape) if isinstance(weight, DTensor) else None,
        "weight_dtype": str(weight.dtype),
        "absmax_local_numel": absmax.to_local().numel() if isinstance(absmax, DTensor) else None,
        "absmax_global_numel": absmax.numel(),
    }
    result["fsdp2"] = train(model, local, distributed=True)


def uneven_nf4_layers(result: dict) -> None:
    # 33 and 7 output rows over 2 ranks: FSDP2 shards them 17 + 16 and 4 + 3 (odd K too: bnb's flat layout).
    def stack(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            LinearNF4.from_linear(nn.Linear(64, 33)),
            LinearNF4.from_linear(nn.Linear(33, 7, bias=False)),
            LinearNF4.from_linear(nn.Linear(7, 5), blocksize=32, double_quant=False),
        )

    plain, other = stack(0), stack(1)
    sharded = copy.deepcopy(plain)
    for layer in sharded:
        fully_shard(layer)
    fully_shard(sharded)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    whole = full_model_state_dict(sharded)
    want = plain.state_dict()
    result["uneven_state_dict_equal"] = sorted(whole) == sorted(want) and all(
        torch.equal(whole[k], want[k]) for k in want
    )
    load_full_model_state_dict(sharded, other.state_dict())
    with torch.no_grad():
        result["uneven_loaded_forward_equal"] = torch.equal(sharded(x), other(x))
    # load_state_dict itself takes whole tensors (LinearNF4 cuts its shards) and a sharded state dict
    # (DTensor values, gathered by LinearNF4) into the sharded model.
    third = stack(2)
    sharded.load_state_dict(third.state_dict())
    sharded.load_state_dict(sharded.state_dict())
    with torch.no_grad():
        result["uneven_sharded_roundtrip_equal"] = torch.equal(sharded(x), third(x))


def mode_save(result: dict, directory: Path) -> None:
    rank = dist.get_rank()
    for mode in MODES:
        torch.manual_seed(1000 + rank)  # per-rank dropout streams, as real runs have
        model, optimizer = build(mode, seed=0)
        result[f"{mode}_uninterrupted"] = run_steps(model, optimizer, range(RESUME_STEPS), local_batch, True)
        result[f"{mode}_uninterrupted_lora_sum"] = sum(t.double().sum().item() for t in lora_tensors(model).values())

        torch.manual_seed(1000 + rank)
        model, optimizer = build(mode, seed=0)
        result[f"{mode}_first_part"] = run_steps(model, optimizer, range(RESUME_AT), local_batch, True)
        save_checkpoint(model, optimizer, directory / mode, RESUME_AT)

        # The full state dict of the wrapped model: every NF4 key equals the unwrapped model's, byte for byte.
        torch.manual_seed(0)
        reference = prepare_qlora(make_model("llama"), r=4, alpha=8, dropout=0.2, progress=False).state_dict()
        whole = full_model_state_dict(model)
        nf4_keys = [k for k in reference if ".base_layer.weight" in k]
        result[f"{mode}_full_state_dict_keys_match"] = sorted(whole) == sorted(reference)
        result[f"{mode}_full_state_dict_nf4_equal"] = len(nf4_keys) > 0 and all(
            torch.equal(whole[k], reference[k]) for k in nf4_keys
        )
        saved = load_file(directory / mode / "model.safetensors") if rank == 0 else None
        if rank == 0:
            result[f"{mode}_checkpoint_model_equal"] = all(torch.equal(saved[k], whole[k]) for k in whole)

        # Adapters: rank 0 writes the gathered LoRA weights; a fresh wrapped model loads them back.
        trained = lora_tensors(model)
        save_adapter_distributed(model, directory / f"adapter_{mode}")
        if rank == 0:
            on_disk = load_file(directory / f"adapter_{mode}" / ADAPTER_WEIGHTS)
            result[f"{mode}_adapter_file_equal"] = sorted(on_disk) == sorted(trained) and all(
                torch.equal(on_disk[k], trained[k]) for k in trained
            )
        fresh, _ = build(mode, seed=7)
        before = lora_tensors(fresh)
        load_adapter_distributed(fresh, directory / f"adapter_{mode}")
        loaded = lora_tensors(fresh)
        result[f"{mode}_adapter_loaded_equal"] = all(torch.equal(loaded[k], trained[k]) for k in trained)
        result[f"{mode}_adapter_fresh_differed"] = any(not torch.equal(before[k], trained[k]) for k in trained)
    uneven_nf4_layers(result)
    broadcast_odd_offsets(result)
    distributed_checkpoint_round_trip(result, directory / "dcp")


def distributed_checkpoint_round_trip(result: dict, path: Path) -> None:
    """torch.distributed.checkpoint (what accelerate's FSDP2 save_state / load_state run) saves an FSDP2 model's
    sharded state dict, LinearNF4's bitsandbytes-format keys included, and loads it into a model whose NF4 bytes
    and adapters differ: the outputs then agree exactly."""
    batch = local_batch(0)

    def build_changed(seed: int) -> nn.Module:
        model, _ = build("fsdp2", seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # adapters that change the output (B starts at 0)
                    p.add_(torch.randn_like(p) * 0.05)
        return model.eval()

    source = build_changed(seed=5)
    dcp.save(get_model_state_dict(source), checkpoint_id=str(path))
    target = build_changed(seed=6)
    with torch.no_grad():
        for layer in target.modules():  # other NF4 bytes, same quantization format
            if isinstance(layer, LinearNF4):
                local = layer.weight.to_local() if isinstance(layer.weight, DTensor) else layer.weight
                local.copy_(torch.randint_like(local, 0, 256))
        differed = not torch.equal(source(**batch).logits, target(**batch).logits)
        state = get_model_state_dict(target)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(target, state)
        equal = torch.equal(source(**batch).logits, target(**batch).logits)
    flags = torch.tensor([differed, equal], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    result["dcp_target_differed"], result["dcp_round_trip_equal"] = bool(flags[0]), bool(flags[1])


def broadcast_odd_offsets(result: dict) -> None:
    # load_checkpoint sends rank 0's tensors as one byte buffer: wider dtypes after an odd-length one.
    from fastllm.nn.checkpoint import _broadcast_tensors

    g = torch.Generator().manual_seed(3)
    sent = {
        "bytes": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        "f32": torch.randn(2, 5, generator=g),
        "one": torch.tensor([7], dtype=torch.uint8),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "i64": torch.arange(4),
        "scalar": torch.tensor(2.5),
    }
    got = _broadcast_tensors(sent if dist.get_rank() == 0 else None, torch.device("cpu"))
    same = sorted(got) == sorted(sent)
    same = same and all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in sent.items())
    ok = torch.tensor(int(same))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    result["broadcast_odd_offsets_equal"] = bool(ok.item())


def mode_resume(result: dict, directory: Path) -> None:
    for mode in MODES:
        torch.manual_seed(4242)  # another RNG state and another initial model: the checkpoint must restore both
        model, optimizer = build(mode, seed=9)
        step = load_checkpoint(model, optimizer, directory / mode)
        result[f"{mode}_resumed_step"] = step
        result[f"{mode}_resumed"] = run_steps(model, optimizer, range(step, RESUME_STEPS), local_batch, True)
        result[f"{mode}_resumed_lora_sum"] = sum(t.double().sum().item() for t in lora_tensors(model).values())
    # Control: the same resume without the RNG states draws other dropout masks.
    torch.manual_seed(4242)
    model, optimizer = build("fsdp2", seed=9)
    step = load_checkpoint(model, optimizer, directory / "fsdp2", restore_rng=False)
    result["fsdp2_resumed_without_rng"] = run_steps(model, optimizer, range(step, RESUME_STEPS), local_batch, True)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    result: dict = {}
    if mode == "train":
        mode_train(result)
    elif mode == "save":
        mode_save(result, Path(sys.argv[3]))
    elif mode == "resume":
        mode_resume(result, Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
