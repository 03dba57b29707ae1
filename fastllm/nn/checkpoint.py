"""Save and resume training runs, in one process or under DDP / FSDP2 (``fully_shard``), any backend.

A checkpoint is a directory, written whole by rank 0 and swapped into place atomically
(:func:`fastllm._atomic.atomic_directory`): a reader sees the previous checkpoint or the new one.

- ``model.safetensors``: the full model state dict (fastllm's NF4 layers in bitsandbytes' format);
- ``optimizer.safetensors`` / ``rng.safetensors``: the optimizer's tensors (per parameter FQN) and every
  rank's torch RNG states (CPU and CUDA);
- ``checkpoint.json``: the step, the world size, the optimizer's other values and param groups, every
  rank's Python (and NumPy) RNG state.

Sharded tensors are gathered whole (full-state dicts: ``DTensor.full_tensor`` for the model, whose NF4
keys are not parameter names, and ``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``
for the optimizer), so a checkpoint loads into any layout: one process, DDP, or
FSDP2 on another number of ranks (the RNG states then need the same world size). Loading reads the files
on rank 0 only and broadcasts them: other nodes need not see rank 0's disk. Every function here is
collective under torch.distributed: call it on every rank.

:func:`save_adapter_distributed` / :func:`load_adapter_distributed` are :func:`fastllm.save_adapter` /
:func:`fastllm.load_adapter` for DDP- or FSDP2-wrapped models.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from fastllm._atomic import atomic_directory
from fastllm.nn._dtensor import copy_full_, full_tensor, is_dtensor
from fastllm.nn.adapters import load_adapter, require_lora_layers, save_adapter
from fastllm.nn.lora import LoraLinear

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own modules)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _comm_device() -> torch.device:
    # Where the process group can send tensors: NCCL only sends CUDA tensors.
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run_on_rank0(fn, *args) -> object:
    """fn(*args) on rank 0; its result (or its exception, re-raised everywhere) broadcast to every rank."""
    outcome: list = [None]
    if _rank() == 0:
        try:
            outcome[0] = ("ok", fn(*args))
        except Exception as exc:  # re-raised on every rank below, so no rank waits forever
            outcome[0] = ("error", exc)
    if _distributed():
        dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise value
    return value


def _broadcast_tensors(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's dict of CPU tensors on every rank (CPU), sent as one byte buffer."""
    if not _distributed():
        return tensors
    layout: list = [None]
    if _rank() == 0:
        layout[0] = [(k, v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in tensors.items()]
    dist.broadcast_object_list(layout, src=0)
    total = sum(nbytes for *_, nbytes in layout[0])
    if _rank() == 0:
        parts = [v.contiguous().reshape(-1).view(torch.uint8) for v in tensors.values()]
        buffer = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    else:
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    buffer = buffer.cpu()
    out, start = {}, 0
    for key, dtype, shape, nbytes in layout[0]:
        # clone first: a slice at an odd byte offset cannot be viewed as a wider dtype
        out[key] = buffer[start : start + nbytes].clone().view(dtype).reshape(shape)
        start += nbytes
    return out


# -- model ---------------------------------------------------------------------------------------


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on CPU (DTensor shards gathered; collective), keys without DDP's prefix.

    Every rank returns it (rank 0's copy is the one :func:`save_checkpoint` writes).
    """
    return {k: full_tensor(v).detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a whole (unsharded) state dict into ``model``, also when FSDP2 shards it (collective).

    Every rank passes the same ``state_dict``. Tensors that are parameters or buffers sharded as DTensors
    are cut into this rank's shard; fastllm's NF4 layers take whole tensors themselves. Raises what
    ``load_state_dict`` raises (``strict``: missing or unexpected keys are errors).
    """
    module = unwrap(model)
    current = module.state_dict()
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    local = {}
    for key, value in state_dict.items():
        target = current.get(key)
        if key in named and is_dtensor(target) and tuple(target.shape) == tuple(value.shape):
            from torch.distributed.tensor import distribute_tensor

            value = value.to(device=target.device, dtype=target.dtype)
            try:  # torch >= 2.7: every rank slices its own part, no scatter
                value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            except TypeError:
                value = distribute_tensor(value, target.device_mesh, target.placements)
        local[key] = value
    module.load_state_dict(local, strict=strict)


# -- optimizer -----------------------------------------------------------------------------------


def _json_value(value: object) -> object:
    # JSON keeps lists only; tuples (Adam's betas) come back as tuples.
    if isinstance(value, tuple):
        return {"__tuple__": [_json_value(v) for v in value]}
    return value


def _from_json_value(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"__tuple__"}:
        return tuple(_from_json_value(v) for v in value["__tuple__"])
    return value


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's full state dict (keyed by parameter FQN; collective) as (tensors, JSON record).

    The record is the state dict with every tensor replaced by {"tensor": its key in the tensors}.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if _distributed() else None
    osd = get_optimizer_state_dict(unwrap(model), optimizer, options=options)
    tensors: dict[str, torch.Tensor] = {}
    state = {}
    for fqn, values in osd.get("state", {}).items():
        state[fqn] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                key = f"t{len(tensors)}"
                tensors[key] = full_tensor(value).detach().cpu()
                state[fqn][name] = {"tensor": key}
            else:
                state[fqn][name] = _json_value(value)
    groups = [{k: _json_value(v) for k, v in group.items()} for group in osd.get("param_groups", [])]
    return tensors, {"state": state, "param_groups": groups}


def _load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, record: dict, tensors: dict[str, torch.Tensor]
) -> None:
    # Every rank passes the whole state dict; torch.distributed.checkpoint keeps each rank's shard.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    def value(v: object) -> object:
        return tensors[v["tensor"]] if isinstance(v, dict) and set(v) == {"tensor"} else _from_json_value(v)

    osd = {
        "state": {fqn: {name: value(v) for name, v in values.items()} for fqn, values in record["state"].items()},
        "param_groups": [{k: _from_json_value(v) for k, v in group.items()} for group in record["param_groups"]],
    }
    options = StateDictOptions(full_state_dict=True) if _distributed() else None
    set_optimizer_state_dict(unwrap(model), optimizer, osd, options=options)


# -- RNG -----------------------------------------------------------------------------------------


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    # This rank's generators: torch CPU (and CUDA) as tensors, Python's and NumPy's as JSON values.
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    version, internal, gauss = random.getstate()
    values: dict = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        values["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, values


def _set_rng_state(tensors: dict[str, torch.Tensor], values: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1) if f"cuda{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in values:
        import numpy as np

        name, keys, pos, has_gauss, cached = values["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _gather_objects(obj: object) -> list:
    if not _distributed():
        return [obj]
    out: list = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: str | os.PathLike, step: int
) -> Path:
    """Write the model, the optimizer and every rank's RNG state after ``step`` into ``directory``.

    Collective (every rank calls it); rank 0 gathers and writes, replacing ``directory`` atomically.
    ``model``: a plain module, a DDP wrapper or an FSDP2-sharded module; ``optimizer``: its optimizer (or
    None). Returns the directory. An error while writing is raised on every rank; the previous checkpoint
    in ``directory`` is then left as it was.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    directory = Path(directory)
    model_state = full_model_state_dict(model)
    optim_tensors, optim_values = _optimizer_state(model, optimizer) if optimizer is not None else ({}, {})
    rng = _gather_objects(_rng_state())

    def write() -> Path:
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": _world(),
            "optimizer": optim_values if optimizer is not None else None,
            "rng": [values for _, values in rng],
        }
        rng_tensors = {f"rank{r}.{name}": t for r, (tensors, _) in enumerate(rng) for name, t in tensors.items()}
        with atomic_directory(directory) as staging:
            save_file({k: v.contiguous() for k, v in model_state.items()}, staging / MODEL_FILE)
            save_file({k: v.contiguous() for k, v in optim_tensors.items()}, staging / OPTIMIZER_FILE)
            save_file(rng_tensors, staging / RNG_FILE)
            (staging / META_FILE).write_text(json.dumps(meta))
        return directory

    return _run_on_rank0(write)


def _read_checkpoint(directory: Path) -> tuple[dict, dict, dict, dict]:
    missing = [f for f in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, META_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a fastllm checkpoint: missing {missing}")
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / META_FILE}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / META_FILE}: not a format-{FORMAT_VERSION} fastllm checkpoint record")
    return (
        meta,
        load_file(directory / MODEL_FILE),
        load_file(directory / OPTIMIZER_FILE),
        load_file(directory / RNG_FILE),
    )


def load_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    directory: str | os.PathLike,
    restore_rng: bool = True,
) -> int:
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``); returns the step.

    Collective. Rank 0 reads the files and broadcasts them; each rank keeps its shard. With ``restore_rng``
    each rank gets back its own RNG states, which needs the world size of the run that saved (else
    ValueError; pass ``restore_rng=False`` to resume on another number of ranks without them).
    Raises FileNotFoundError / ValueError naming the file for a missing or malformed checkpoint, and what
    ``load_state_dict`` raises for a model that does not match.
    """
    directory = Path(directory)
    files: dict[str, dict] = {}

    def read() -> dict:
        meta, files["model"], files["optimizer"], files["rng"] = _read_checkpoint(directory)
        return meta

    meta = _run_on_rank0(read)  # files stay on rank 0; meta (small) is on every rank
    if restore_rng and meta["world_size"] != _world():
        raise ValueError(
            f"{directory}: saved by {meta['world_size']} ranks, resumed on {_world()}; per-rank RNG states cannot be "
            "restored (pass restore_rng=False)"
        )
    if optimizer is not None and meta["optimizer"] is None:
        raise ValueError(f"{directory}: the checkpoint holds no optimizer state")
    device = _comm_device()
    load_full_model_state_dict(model, _broadcast_tensors(files.get("model"), device))
    if optimizer is not None:
        _load_optimizer_state(model, optimizer, meta["optimizer"], _broadcast_tensors(files.get("optimizer"), device))
    if restore_rng:
        rng_tensors = _broadcast_tensors(files.get("rng"), device)
        prefix = f"rank{_rank()}."
        mine = {k[len(prefix) :]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
        _set_rng_state(mine, meta["rng"][_rank()])
    return int(meta["step"])


# -- adapters ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _whole_lora_parameters(model: nn.Module, gather: bool) -> Iterator[dict[str, LoraLinear]]:
    """Swap every LoraLinear's (possibly sharded) lora_A / lora_B for whole plain Parameters, and back.

    ``gather``: fill them with the gathered values (collective), else zeros. Yields the layers by path.
    """
    layers = require_lora_layers(unwrap(model))
    saved = {}
    try:
        for name, layer in layers.items():
            for attr in ("lora_A", "lora_B"):
                param = saved[(name, attr)] = layer._parameters[attr]
                value = full_tensor(param.detach()).clone() if gather else torch.zeros(param.shape, dtype=param.dtype)
                layer._parameters[attr] = nn.Parameter(value.cpu(), requires_grad=False)
        yield layers
    finally:
        for (name, attr), param in saved.items():
            layers[name]._parameters[attr] = param


def save_adapter_distributed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """:func:`fastllm.save_adapter` for a DDP- or FSDP2-wrapped model (collective; rank 0 writes).

    The LoRA weights are gathered whole; the files are those of ``save_adapter`` on the unwrapped model.
    """
    with _whole_lora_parameters(model, gather=True):
        return _run_on_rank0(save_adapter, unwrap(model), directory)


def load_adapter_distributed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """:func:`fastllm.load_adapter` for a DDP- or FSDP2-wrapped model (collective). Returns ``model``.

    Every rank reads ``path`` (as ``from_pretrained`` does: it must be visible on every node) into whole
    LoRA weights with ``load_adapter``'s checks and config handling, then keeps its own shard of them. The
    model's weights are unchanged when ``load_adapter`` raises.
    """
    with _whole_lora_parameters(model, gather=False) as layers:
        load_adapter(unwrap(model), path)
        loaded = {(n, a): layer._parameters[a].detach() for n, layer in layers.items() for a in ("lora_A", "lora_B")}
    for (name, attr), value in loaded.items():
        copy_full_(getattr(layers[name], attr), value)
    return model
