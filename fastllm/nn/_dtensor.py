"""DTensor helpers for modules whose parameters FSDP2 (``fully_shard``) turns into dim-0 shards.

Collective functions (marked so) must be called on every rank of the mesh in the same order.
"""

from __future__ import annotations

import torch


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False where torch has no distributed support)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t.full_tensor()`` for a DTensor (collective: an all-gather), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def flatten(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)``, keeping a DTensor sharded where its shards flatten to a dim-0 shard.

    A dim-0 shard of whole rows flattens to a dim-0 shard of the flat tensor only when every rank holds
    the same number of rows; otherwise (FSDP2 shards 33 rows over 2 ranks as 17 + 16) the rows are gathered
    first (collective) and the result is a plain tensor.
    """
    if not is_dtensor(t):
        return t.reshape(-1)
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, t.placements
    shards = 1
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            shards *= mesh.size(dim)
        elif not isinstance(placement, Replicate):
            return t.full_tensor().reshape(-1)
    if t.shape[0] % shards == 0:
        return t.reshape(-1)
    return t.full_tensor().reshape(-1)


def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a whole ``value``, also when ``param`` is a DTensor shard.

    Every rank must pass the same ``value`` (each keeps its own part, with the shard boundaries of
    ``param``; no communication); ``param`` is updated in place, so FSDP2 keeps managing it.
    Raises ValueError when the shapes differ.
    """
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"cannot copy a tensor of shape {tuple(value.shape)} into one of shape {tuple(param.shape)}")
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            value = value.to(device=param.device, dtype=param.dtype)
            try:  # torch >= 2.7: every rank slices its own part of the same full tensor, no scatter
                shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            except TypeError:
                shard = distribute_tensor(value, param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value)
