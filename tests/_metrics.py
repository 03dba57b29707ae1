"""The error measure every test reports: relative error in fp64."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (the absolute ||out - ref|| where ref is exactly 0, e.g. dq with one key)."""
    norm = ref.double().norm()
    return ((out.double() - ref.double()).norm() / (norm if norm > 0 else 1.0)).item()
