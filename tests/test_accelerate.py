"""``accelerate launch`` with an FSDP2 config (gloo, 2 CPU processes) trains a prepare_qlora model through fastllm's
Trainer exactly like one process does, the NF4 weights sharded across the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "accelerate_worker.py"

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


def run(command: list[str], out: Path) -> dict:
    # Plain CPU path in the workers (TRITON_INTERPRET=0): the interpreted kernels are covered elsewhere.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


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
    return {"fsdp2": run(launch, root / "fsdp2.json"), "single": run([sys.executable], root / "single.json")}


def test_fsdp2_matches_one_process(runs):
    fsdp2, single = runs["fsdp2"], runs["single"]
    assert fsdp2["world_size"] == 2 and fsdp2["fsdp"] and single["world_size"] == 1 and not single["fsdp"]
    assert len(fsdp2["losses"]) == len(single["losses"]) == 4
    assert single["losses"][-1] < single["losses"][0]  # the adapters train
    # fp32 throughout; the two runs differ only in how the gradient sums are split and reduced (two halves of the
    # batch, reduce-scatter over gloo), a relative 1e-7 per step that AdamW carries over 4 steps: 1e-5 bounds it.
    for step, (ours, ref) in enumerate(zip(fsdp2["losses"], single["losses"], strict=True)):
        assert abs(ours - ref) / abs(ref) < 1e-5, (step, fsdp2["losses"], single["losses"])


def test_fsdp2_shards_the_nf4_weights(runs):
    fsdp2, single = runs["fsdp2"], runs["single"]
    # q_proj: 64 x 64 weights -> packed uint8 (64, 32), row-sharded over 2 ranks.
    assert single["nf4_weight_type"] == "Parameter" and single["nf4_weight_local_shape"] == [64, 32]
    assert fsdp2["nf4_weight_type"] == "DTensor" and fsdp2["nf4_weight_local_shape"] == [32, 32]
    assert fsdp2["nf4_weight_dtype"] == single["nf4_weight_dtype"] == "torch.uint8"
