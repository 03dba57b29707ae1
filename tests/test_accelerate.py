"""``accelerate launch`` with an FSDP2 config (gloo, 2 CPU processes) trains a prepare_qlora model through fastllm's
Trainer exactly like one process does, the NF4 weights sharded across the ranks; its checkpoints hold the LoRA
adapter alone (PEFT loads it) with either FSDP state dict type, and a run resumed from one continues the
uninterrupted run exactly."""

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
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")

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
    # The FSDP2 launch also checkpoints and resumes (under fsdp2/<state dict type>/); the single process only trains.
    (root / "fsdp2").mkdir()
    (root / "single").mkdir()
    return {
        "fsdp2": run(launch, root / "fsdp2" / "result.json", "checkpoint"),
        "single": run([sys.executable], root / "single" / "result.json"),
        "root": root / "fsdp2",
    }


def test_fsdp2_matches_one_process(runs):
    fsdp2, single = runs["fsdp2"], runs["single"]
    assert fsdp2["world_size"] == 2 and fsdp2["fsdp"] and single["world_size"] == 1 and not single["fsdp"]
    assert sorted(losses(single)) == list(range(1, STEPS + 1))
    assert losses(single)[STEPS] < losses(single)[1]  # the adapters train
    # fp32 throughout; the two runs differ only in how the gradient sums are split and reduced (two halves of the
    # batch, reduce-scatter over gloo), a relative 1e-7 per step that AdamW carries over 4 steps: 1e-5 bounds it.
    # (The FSDP2 runs checkpoint every 2 steps, which must not change their training.)
    for record in (fsdp2, *(fsdp2[t] for t in STATE_DICT_TYPES)):
        ours, ref = losses(record), losses(single)
        assert sorted(ours) == sorted(ref)
        for step in ref:
            assert abs(ours[step] - ref[step]) / abs(ref[step]) < 1e-5, (step, ours, ref)


def test_fsdp2_shards_the_nf4_weights(runs):
    fsdp2, single = runs["fsdp2"], runs["single"]
    # q_proj: 64 x 64 weights -> packed uint8 (64, 32), row-sharded over 2 ranks.
    assert single["nf4_weight_type"] == "Parameter" and single["nf4_weight_local_shape"] == [64, 32]
    assert fsdp2["nf4_weight_type"] == "DTensor" and fsdp2["nf4_weight_local_shape"] == [32, 32]
    assert fsdp2["nf4_weight_dtype"] == single["nf4_weight_dtype"] == "torch.uint8"


@pytest.mark.parametrize("state_dict_type", STATE_DICT_TYPES)
def test_fsdp2_resume_reproduces_the_uninterrupted_run(runs, state_dict_type):
    full = runs["fsdp2"][state_dict_type]
    resumed = full["resumed"]
    assert sorted(losses(resumed)) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step, loss in losses(resumed).items():
        # Exactly: the same adapter, optimizer, scheduler and RNG states, the same batches and the same reductions.
        assert loss == losses(full)[step], (step, losses(resumed), losses(full))
    # The resumed model started from another adapter (seed 1): ending where the uninterrupted run ended means the
    # checkpoint's adapter and optimizer state were loaded.
    assert torch.equal(torch.tensor(resumed["logits"]), torch.tensor(full["logits"]))


def lora_layer_names() -> list[str]:
    model = prepare_qlora(make_model("llama"), r=4, progress=False)
    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLinear))


def optimizer_state_keys(checkpoint: Path, state_dict_type: str) -> set[str]:
    """The ``"<parameter FQN>.<AdamW state>"`` entries of the optimizer checkpoint accelerate wrote (read without the
    process group: DCP's metadata of the sharded one, the whole state dict of the full one)."""
    if state_dict_type == "SHARDED_STATE_DICT":
        import torch.distributed.checkpoint as dcp

        stored = dcp.FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata().state_dict_metadata
        state = {k.removeprefix("optimizer.state.") for k in stored if k.startswith("optimizer.state.")}
        assert all(k.startswith("optimizer.param_groups.") for k in stored if not k.startswith("optimizer.state.")), (
            stored
        )
        return state
    osd = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
    assert set(osd) == {"state", "param_groups"}
    return {f"{fqn}.{name}" for fqn, values in osd["state"].items() for name in values}


@pytest.mark.parametrize("state_dict_type", STATE_DICT_TYPES)
def test_fsdp2_checkpoint_holds_the_adapter_alone(runs, state_dict_type):
    layers = lora_layer_names()
    adapter_keys = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    optimizer = {"SHARDED_STATE_DICT": "optimizer_0", "FULL_STATE_DICT": "optimizer.bin"}[state_dict_type]
    for step in (SAVE_EVERY, STEPS):
        checkpoint = runs["root"] / state_dict_type / "trainer" / f"checkpoint-{step}"
        names = {p.name for p in checkpoint.iterdir()}
        # The adapter, accelerate's optimizer checkpoint, Trainer's per-rank RNG states and state files: nothing else
        # (no pytorch_model_fsdp_0/ or pytorch_model_fsdp.bin, no model.safetensors, ...).
        assert names == {
            ADAPTER_WEIGHTS,
            ADAPTER_CONFIG,
            optimizer,
            "scheduler.pt",
            "rng_state_0.pth",
            "rng_state_1.pth",
            "trainer_state.json",
            "training_args.bin",
        }, names
        assert set(load_file(checkpoint / ADAPTER_WEIGHTS)) == adapter_keys
        config = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
        assert sorted(config["target_modules"]) == layers
        # The optimizer checkpoint holds AdamW's state of the LoRA matrices and nothing of the frozen model.
        expected = {f"{n}.lora_{ab}.{s}" for n in layers for ab in "AB" for s in ("exp_avg", "exp_avg_sq", "step")}
        stored = optimizer_state_keys(checkpoint, state_dict_type)
        assert stored == expected, sorted(stored ^ expected)


@pytest.mark.parametrize("state_dict_type", STATE_DICT_TYPES)
def test_peft_loads_the_fsdp2_checkpoints_onto_the_dense_base(runs, state_dict_type):
    from peft import PeftModel

    with plain_cpu_path():
        # The dense base with the NF4 weights the workers quantized (the same base weights, quantized alike) ...
        dense = with_dequantized_weights(make_model("llama"), prepare_qlora(make_model("llama"), r=4, progress=False))
    g = torch.Generator().manual_seed(7)
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 11), generator=g)}  # the worker's batch
    record = runs["fsdp2"][state_dict_type]
    # ... plus the adapter of the last checkpoint gives the logits of the FSDP2 run's final model, and that of the mid
    # checkpoint those of the same model after _load_best_model (load_best_model_at_end) rewound it there.
    for step, ours in ((STEPS, record["logits"]), (SAVE_EVERY, record["best_logits"])):
        checkpoint = runs["root"] / state_dict_type / "trainer" / f"checkpoint-{step}"
        peft_model = PeftModel.from_pretrained(dense, str(checkpoint)).eval()
        expected = logits(peft_model, batch)
        assert rel_err(torch.tensor(ours), expected) < 1e-5, step
        with peft_model.disable_adapter():  # ... and the adapter matters
            assert rel_err(logits(peft_model, batch), expected) > 1e-3
        dense = peft_model.unload()
    assert rel_err(torch.tensor(record["best_logits"]), torch.tensor(record["logits"])) > 1e-4  # two adapters
