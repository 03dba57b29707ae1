"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Trains the same prepare_qlora'd tiny Llama three ways for a few AdamW steps: on rank 0 alone over the
full batch (the single-process reference), with DDP and with FSDP2 (``fully_shard`` per decoder layer
and at the root), each rank taking half the batch. Rank 0 writes the per-step losses and what FSDP2
did to the NF4 weights to the JSON file named by argv[1].
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import make_batch, make_model  # noqa: E402

from fastllm import LinearNF4, prepare_qlora  # noqa: E402

STEPS = 4


def train(model: torch.nn.Module, batch: dict, distributed: bool) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if distributed:  # every rank holds the same number of tokens: the global loss is the mean
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False).train()
    full = make_batch("llama", batch=2 * world, seq=12)
    local = {k: v[rank * 2 : rank * 2 + 2] for k, v in full.items()}
    result = {}
    if rank == 0:
        result["single"] = train(copy.deepcopy(base), full, distributed=False)
    result["ddp"] = train(DistributedDataParallel(copy.deepcopy(base)), local, distributed=True)

    model = copy.deepcopy(base)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
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
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
