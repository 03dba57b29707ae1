"""DDP and FSDP2 (gloo, 2 CPU processes) train a prepare_qlora'd model exactly like one process does, and a run
checkpointed after step k and resumed in fresh processes reproduces the uninterrupted run's losses bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "distributed_worker.py"

pytestmark = pytest.mark.distributed


def torchrun(mode: str, out: Path, *args: str) -> dict:
    # The workers take the plain CPU path (dequantize + torch matmul): the interpreted Triton kernels
    # are covered elsewhere and would only slow two processes down.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*command, str(WORKER), mode, str(out), *args], env=env, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[rank")]  # the ranks' tracebacks
    assert proc.returncode == 0, "\n".join(errors[-60:]) or proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return torchrun("train", tmp_path_factory.mktemp("distributed") / "losses.json")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("checkpoint")
    saved = torchrun("save", root / "save.json", str(root / "ckpt"))
    # A second torchrun: the resumed run shares no memory with the one that saved.
    return saved, torchrun("resume", root / "resume.json", str(root / "ckpt"))


def assert_losses_match(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == 4
    assert reference[-1] < reference[0]  # the adapters train
    for step, (ours, ref) in enumerate(zip(losses, reference, strict=True)):
        assert abs(ours - ref) / abs(ref) < 1e-4, (step, losses, reference)


def test_ddp_matches_single_process(runs):
    assert_losses_match(runs["ddp"], runs["single"])


def test_fsdp2_matches_single_process_and_shards_nf4(runs):
    assert_losses_match(runs["fsdp2"], runs["single"])
    sharding = runs["fsdp2_sharding"]
    # q_proj: 64 x 64 weights -> packed uint8 (64, 32), row-sharded over 2 ranks; 64 absmax codes -> 32 each.
    assert sharding["weight_is_dtensor"] and sharding["weight_placements_shard0"]
    assert sharding["weight_dtype"] == "torch.uint8"
    assert sharding["weight_global_shape"] == [64, 32] and sharding["weight_local_shape"] == [32, 32]
    assert sharding["absmax_global_numel"] == 64 and sharding["absmax_local_numel"] == 32


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit(resumed, mode):
    saved, resume = resumed
    full = saved[f"{mode}_uninterrupted"]
    assert len(full) == 6 and all(abs(x) < float("inf") for x in full)
    # Same process, same seeds: the first part is the uninterrupted run's prefix (exact; the checkpoint
    # is written after it).
    assert saved[f"{mode}_first_part"] == full[:3]
    assert resume[f"{mode}_resumed_step"] == 3
    # Fresh processes, another seed and another initial model, restored from disk: exactly equal floats
    # (dropout is on, so the per-rank RNG states had to come back too).
    assert resume[f"{mode}_resumed"] == full[3:], (resume[f"{mode}_resumed"], full)
    assert resume[f"{mode}_resumed_lora_sum"] == saved[f"{mode}_uninterrupted_lora_sum"]


def test_resume_without_the_rng_states_differs(resumed):
    # The control that makes the equality above mean something: other dropout masks, other losses.
    saved, resume = resumed
    assert resume["fsdp2_resumed_without_rng"] != saved["fsdp2_uninterrupted"][3:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_full_state_dict_and_adapters_of_a_wrapped_model(resumed, mode):
    saved, _ = resumed
    assert saved[f"{mode}_full_state_dict_keys_match"]
    assert saved[f"{mode}_full_state_dict_nf4_equal"]  # the bitsandbytes bytes of every NF4 layer
    assert saved[f"{mode}_checkpoint_model_equal"]
    assert saved[f"{mode}_adapter_file_equal"]  # save_adapter_distributed wrote the gathered LoRA weights
    assert saved[f"{mode}_adapter_fresh_differed"] and saved[f"{mode}_adapter_loaded_equal"]


def test_unevenly_sharded_nf4_layers_save_and_load(resumed):
    saved, _ = resumed
    assert saved["uneven_state_dict_equal"]
    assert saved["uneven_loaded_forward_equal"]
    assert saved["uneven_sharded_roundtrip_equal"]


def test_checkpoint_broadcast_keeps_every_dtype_at_odd_byte_offsets(resumed):
    assert resumed[0]["broadcast_odd_offsets_equal"]


def test_torch_distributed_checkpoint_saves_and_loads_nf4_layers(resumed):
    """accelerate's FSDP2 save_state / load_state path (torch.distributed.checkpoint) maps LinearNF4's
    bitsandbytes-format keys (weight.absmax, weight.quant_state.bitsandbytes__nf4, ...) and round-trips them."""
    saved, _ = resumed
    assert saved["dcp_target_differed"] and saved["dcp_round_trip_equal"]
