"""fastllm.nn.checkpoint in one process: resume reproduces the losses exactly; writes are atomic; bad input.

The distributed paths (DDP, FSDP2 under torchrun) are in tests/test_distributed.py.
"""

import json

import pytest
import torch
from torch import nn

import fastllm.nn.checkpoint as ckpt
from fastllm import prepare_qlora
from fastllm.nn.checkpoint import load_checkpoint, save_checkpoint


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = prepare_qlora(Tiny(), r=4, alpha=8, dropout=0.25, progress=False).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def steps(model, optimizer, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(step))
        loss = (model(x) - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_resume_reproduces_the_losses_exactly(tmp_path):
    model, optimizer = build(0)
    steps(model, optimizer, 0, 2)
    assert save_checkpoint(model, optimizer, tmp_path / "ck", 2) == tmp_path / "ck"
    uninterrupted = steps(model, optimizer, 2, 4)

    torch.manual_seed(123)  # another RNG state (dropout is on) and another initial model
    model, optimizer = build(1)
    assert load_checkpoint(model, optimizer, tmp_path / "ck") == 2
    assert steps(model, optimizer, 2, 4) == uninterrupted

    torch.manual_seed(123)  # control: without the RNG states the dropout masks differ
    model, optimizer = build(1)
    load_checkpoint(model, optimizer, tmp_path / "ck", restore_rng=False)
    assert steps(model, optimizer, 2, 4) != uninterrupted


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = build(0)
    steps(model, optimizer, 0, 1)
    save_checkpoint(model, optimizer, tmp_path / "ck", 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    steps(model, optimizer, 1, 2)
    real = ckpt.save_file

    def fail_on_optimizer(tensors, path, *args, **kwargs):
        if str(path).endswith(ckpt.OPTIMIZER_FILE):
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fail_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, optimizer, tmp_path / "ck", 2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging directory left behind
    assert load_checkpoint(*build(3), tmp_path / "ck") == 1


def test_bad_input_is_a_clear_error(tmp_path):
    model, optimizer = build(0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(model, optimizer, tmp_path / "ck", -1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a fastllm checkpoint"):
        load_checkpoint(model, optimizer, tmp_path / "empty")
    save_checkpoint(model, None, tmp_path / "ck", 0)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(model, optimizer, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / ckpt.META_FILE).read_text())
    (tmp_path / "ck" / ckpt.META_FILE).write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(ValueError, match="restore_rng=False"):
        load_checkpoint(model, None, tmp_path / "ck")
    assert load_checkpoint(model, None, tmp_path / "ck", restore_rng=False) == 0
