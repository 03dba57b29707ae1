"""``accelerate launch`` with an FSDP2 config (gloo, 2 CPU processes) trains a prepare_qlora model through fastllm's
Trainer exactly like one process does, the NF4 weights sharded across the ranks; its checkpoints hold the LoRA
adapter alone (PEFT loads it), and a run resumed from one continues the uninterrupted run exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hf_training import plain_cpu_path
from _metrics import rel_err
from _tiny_models import VOCAB, logits, make_model, with_dequantized_weights
from safetensors.torch import load_file

from fastllm import LoraLinear, prepare_qlora
from fastllm.nn.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX

WORKER = Path(__file__).parent / "accelerate_worker.py"
STEPS, SAVE_EVERY = 4, 2  # as in the worker

pytestmark = pytest.mark.distributed

FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
rdzv_backend: static
same_network: true
main_training_function: main
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""


def run(command: list[str], out: Path, *args: str) -> dict:
    # Plain CPU path in the workers (TRITON_INTERPRET=0): the interpreted kernels are covered elsewhere.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*command, str(WORKER), str(out), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def losses(record: dict) -> dict[int, float]:
    return {int(step): loss for step, loss in record["losses"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("accelerate")
    config = root / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        "0",
    ]
    # The FSDP2 run checkpoints and resumes (under fsdp2/); the single-process reference only trains.
    (root / "fsdp2").mkdir()
    (root / "single").mkdir()
    return {
        "fsdp2": run(launch, root / "fsdp2" / "result.json", "resume"),
        "single": run([sys.executable], root / "single" / "result.json"),
        "checkpoints": root / "fsdp2" / "trainer",
    }


def test_fsdp2_matches_one_process(runs):
    fsdp2, single = runs["fsdp2"], runs["single"]
    assert fsdp2["world_size"] == 2 and fsdp2["fsdp"] and single["world_size"] == 1 and not single["fsdp"]
    ours, ref = losses(fsdp2), losses(single)
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]  # the adapters train
    # fp32 throughout; the two runs differ only in how the gradient sums are split and reduced (two halves of the
    # batch, reduce-scatter over gloo), a relative 1e-7 per step that AdamW carries over 4 steps: 1e-5 bounds it.
    # (The FSDP2 run also checkpoints every 2 steps, which must not change its training.)
    for step in ref:
        assert abs(ours[step] - ref[step]) / abs(ref[step]) < 1e-5, (step, ours, ref)


def test_fsdp2_shards_the_nf4_weights(runs):
    fsdp2, single = runs["fsdp2"], runs["single"]
    # q_proj: 64 x 64 weights -> packed uint8 (64, 32), row-sharded over 2 ranks.
    assert single["nf4_weight_type"] == "Parameter" and single["nf4_weight_local_shape"] == [64, 32]
    assert fsdp2["nf4_weight_type"] == "DTensor" and fsdp2["nf4_weight_local_shape"] == [32, 32]
    assert fsdp2["nf4_weight_dtype"] == single["nf4_weight_dtype"] == "torch.uint8"


def test_fsdp2_resume_reproduces_the_uninterrupted_run(runs):
    full, resumed = runs["fsdp2"], runs["fsdp2"]["resumed"]
    assert sorted(losses(resumed)) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step, loss in losses(resumed).items():
        # Exactly: the same adapter, optimizer, scheduler and RNG states, the same batches and the same reductions.
        assert loss == losses(full)[step], (step, losses(resumed), losses(full))
    # The resumed model started from another adapter (seed 1): ending where the uninterrupted run ended means the
    # checkpoint's adapter and optimizer state were loaded.
    assert torch.equal(torch.tensor(resumed["logits"]), torch.tensor(full["logits"]))


def lora_layer_names() -> list[str]:
    return sorted(
        n
        for n, m in prepare_qlora(make_model("llama"), r=4, progress=False).named_modules()
        if isinstance(m, LoraLinear)
    )


def test_fsdp2_checkpoint_holds_the_adapter_alone(runs):
    import torch.distributed.checkpoint as dcp

    layers = lora_layer_names()
    adapter_keys = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    for step in (SAVE_EVERY, STEPS):
        checkpoint = runs["checkpoints"] / f"checkpoint-{step}"
        names = {p.name for p in checkpoint.iterdir()}
        # The adapter, Trainer's per-rank RNG states and state files, accelerate's sharded optimizer: nothing else
        # (no pytorch_model_fsdp_0/, model.safetensors, ...).
        assert names == {
            ADAPTER_WEIGHTS,
            ADAPTER_CONFIG,
            "optimizer_0",
            "scheduler.pt",
            "rng_state_0.pth",
            "rng_state_1.pth",
            "trainer_state.json",
            "training_args.bin",
        }, names
        adapter = load_file(checkpoint / ADAPTER_WEIGHTS)
        assert set(adapter) == adapter_keys
        config = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
        assert sorted(config["target_modules"]) == layers
        # The optimizer checkpoint stores AdamW's state of the LoRA matrices and nothing of the frozen model.
        stored = dcp.FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata().state_dict_metadata
        state = {k for k in stored if k.startswith("optimizer.state.")}
        expected = {
            f"optimizer.state.{n}.lora_{ab}.{s}"
            for n in layers
            for ab in "AB"
            for s in ("exp_avg", "exp_avg_sq", "step")
        }
        assert state == expected, sorted(state ^ expected)
        assert all(k.startswith("optimizer.param_groups.") for k in set(stored) - state), sorted(stored)


def test_peft_loads_the_fsdp2_checkpoint_onto_the_dense_base(runs):
    from peft import PeftModel

    with plain_cpu_path():
        # The dense base with the NF4 weights the workers quantized (the same base weights, quantized alike) ...
        dense = with_dequantized_weights(make_model("llama"), prepare_qlora(make_model("llama"), r=4, progress=False))
    # ... plus the adapter of the last checkpoint must give the logits of the FSDP2 run's final model.
    peft_model = PeftModel.from_pretrained(dense, str(runs["checkpoints"] / f"checkpoint-{STEPS}")).eval()
    g = torch.Generator().manual_seed(7)
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 11), generator=g)}  # the worker's batch
    expected = torch.tensor(runs["fsdp2"]["logits"])
    assert rel_err(logits(peft_model, batch), expected) < 1e-5
    with peft_model.disable_adapter():  # ... and the adapter matters
        assert rel_err(logits(peft_model, batch), expected) > 1e-3
