"""DDP and FSDP2 (gloo, 2 CPU processes) train a prepare_qlora'd model exactly like one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "distributed_worker.py"

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("distributed") / "losses.json"
    # The workers take the plain CPU path (dequantize + torch matmul): the interpreted Triton kernels
    # are covered elsewhere and would only slow two processes down.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*command, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


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
