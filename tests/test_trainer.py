"""fastllm.integrations.trainer: Trainer checkpoints hold the LoRA adapter alone, in PEFT format, and resume exactly.

One tiny Llama (NF4 + LoRA with dropout) trained by Trainer with bf16 autocast, gradient accumulation and
non-reentrant gradient checkpointing for 4 optimizer steps, checkpointing every 2; a second run, from a model whose
adapter starts elsewhere, resumes from the step-2 checkpoint and must log the same losses and end on the same adapter,
bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _hf_training import LossLog, arithmetic_rows, logged_losses, plain_cpu_path
from _metrics import rel_err
from _tiny_models import VOCAB, logits, make_model, with_dequantized_weights
from safetensors.torch import load_file
from transformers import TrainingArguments

from fastllm import LoraLinear, prepare_qlora
from fastllm.integrations.trainer import Trainer
from fastllm.nn.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX

STEPS, SAVE_EVERY, SEQ = 4, 2, 16


@pytest.fixture(scope="module", autouse=True)
def _cpu_path():
    with plain_cpu_path():
        yield


def qlora_llama(adapter_seed: int) -> torch.nn.Module:
    """The tiny Llama (base weights from seed 0), NF4 + LoRA r=4 with dropout, its adapter drawn from adapter_seed."""
    model = make_model("llama")
    torch.manual_seed(adapter_seed)
    return prepare_qlora(model, r=4, alpha=8, dropout=0.1, progress=False)


def make_trainer(model: torch.nn.Module, output_dir: Path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        bf16=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=arithmetic_rows(16, SEQ), callbacks=[LossLog()])


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    full = make_trainer(qlora_llama(adapter_seed=0), root / "full")
    full.train()
    resumed_model = qlora_llama(adapter_seed=1)
    start = lora_state(resumed_model)
    resumed = make_trainer(resumed_model, root / "resumed")
    resumed.train(resume_from_checkpoint=str(root / "full" / f"checkpoint-{SAVE_EVERY}"))
    return {"root": root, "full": full, "resumed": resumed, "resumed_start": start}


def test_resume_reproduces_the_uninterrupted_run(runs):
    full, resumed = logged_losses(runs["full"]), logged_losses(runs["resumed"])
    assert sorted(full) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == full[step], (step, resumed, full)  # exactly: same adapter, optimizer, RNG and batches
    end_full, end_resumed = lora_state(runs["full"].model), lora_state(runs["resumed"].model)
    assert end_full.keys() == end_resumed.keys() and len(end_full) == 2 * 7 * 2
    for key, value in end_full.items():
        assert torch.equal(value, end_resumed[key]), key
    # The resumed model started from another adapter: equality means the checkpoint's adapter was loaded.
    assert all(not torch.equal(runs["resumed_start"][k], v) for k, v in end_full.items())


def _tensors_in(path: Path) -> list[torch.Tensor]:
    """Every tensor stored in a checkpoint file (safetensors, or torch.save'd state without pickled code)."""
    if path.suffix == ".safetensors":
        return list(load_file(path).values())
    if path.suffix in (".pt", ".pth", ".bin"):
        found: list[torch.Tensor] = []

        def walk(obj):
            if isinstance(obj, torch.Tensor):
                found.append(obj)
            elif isinstance(obj, dict):
                for v in obj.values():
                    walk(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    walk(v)

        walk(torch.load(path, map_location="cpu", weights_only=False))
        return found
    return []


def test_checkpoint_holds_the_adapter_alone(runs):
    model = runs["full"].model
    checkpoint = runs["root"] / "full" / f"checkpoint-{SAVE_EVERY}"
    names = {p.name for p in checkpoint.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}, names

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    adapter = load_file(checkpoint / ADAPTER_WEIGHTS)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    assert set(adapter) == expected
    config = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(layers)

    # No frozen tensor of the model (NF4 bytes, absmax, embeddings, norms, head) is anywhere in the checkpoint.
    frozen = [t for k, t in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))]
    stored = [t for p in checkpoint.iterdir() for t in _tensors_in(p)]
    for t in stored:
        assert not any(t.shape == f.shape and t.dtype == f.dtype and torch.equal(t, f) for f in frozen), t.shape
    # Its size is the adapter's (+ AdamW's two moments of the same shapes + small state files), not the model's.
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    total = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert (checkpoint / ADAPTER_WEIGHTS).stat().st_size < adapter_bytes + 16 * 1024
    assert total < 3 * adapter_bytes + 64 * 1024, (total, adapter_bytes)


def test_peft_loads_the_checkpoint_onto_the_dense_base(runs):
    from peft import PeftModel

    # Trainer's accelerate wraps the model's forward in bf16 autocast; compare the model itself, in fp32.
    ours = runs["full"].accelerator.unwrap_model(runs["full"].model, keep_fp32_wrapper=False).eval()
    checkpoint = runs["root"] / "full" / f"checkpoint-{STEPS}"
    # The dense base with our dequantized NF4 weights: the adapter is the only other difference.
    dense = with_dequantized_weights(make_model("llama"), ours)
    peft_model = PeftModel.from_pretrained(dense, str(checkpoint)).eval()
    g = torch.Generator().manual_seed(7)
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 11), generator=g)}
    expected, got = logits(peft_model, batch), logits(ours, batch)
    assert rel_err(got, expected) < 1e-5
    # ... and the adapter matters: without it the logits differ.
    with peft_model.disable_adapter():
        assert rel_err(logits(peft_model, batch), expected) > 1e-3


def test_load_best_model_reads_the_adapter(runs):
    # What load_best_model_at_end=True runs after training (last here: it rewinds the model of the "full" run).
    trainer = runs["full"]
    checkpoint = runs["root"] / "full" / f"checkpoint-{SAVE_EVERY}"
    trainer.state.best_model_checkpoint = str(checkpoint)
    stored = load_file(checkpoint / ADAPTER_WEIGHTS)
    now = lora_state(trainer.model)
    assert any(not torch.equal(now[k[len(PEFT_PREFIX) :].removesuffix(".weight")], v) for k, v in stored.items())
    trainer._load_best_model()
    now = lora_state(trainer.model)
    for key, value in stored.items():
        assert torch.equal(now[key[len(PEFT_PREFIX) :].removesuffix(".weight")], value), key
