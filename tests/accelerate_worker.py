"""Launched by tests/test_accelerate.py under ``accelerate launch`` (FSDP2, gloo, 2 CPU processes with 2 sequences
each): fastllm's Trainer on the tiny prepare_qlora'd Llama. Rank 0 writes the logged per-step losses and what became
of one NF4 weight to the JSON file named by argv[1]. The test calls :func:`train` in its own process (4 sequences)
for the single-process reference.

Both runs see the same global batches: sequential sampling, and accelerate hands rank r the r-th of each pair of
per-device batches, so the two ranks together hold the single process's batch of 4 at every step.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from _hf_training import LossLog, arithmetic_rows, logged_losses  # noqa: E402
from _tiny_models import make_model  # noqa: E402

from fastllm import LinearNF4, prepare_qlora  # noqa: E402
from fastllm.integrations.trainer import Trainer  # noqa: E402

STEPS, SEQ, GLOBAL_BATCH = 4, 16, 4


def fsdp_on_cpu() -> None:
    """accelerate turns an FSDP config into FSDP only on GPU-like devices (``AcceleratorState``: MULTI_GPU, MULTI_XPU,
    ...); with CPU processes it silently trains as DDP (MULTI_CPU). Mark the process state FSDP, with the FSDP2 plugin
    ``accelerate launch`` configured through the environment, for Trainer to take over (``use_configured_state``):
    from there on
    accelerate's own FSDP2 preparation (``fsdp2_prepare_model``: ``fully_shard`` per decoder layer, embeddings, root),
    its gradient clipping and Trainer's FSDP paths run on the CPU as they do on GPUs."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = Accelerator(cpu=True).state  # the process-wide state that Trainer's Accelerator will share
    assert state.distributed_type == DistributedType.MULTI_CPU and state.num_processes == 2, state
    # Both shared states: every new AcceleratorState copies the PartialState's distributed_type over its own.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    assert state.fsdp_plugin.fsdp_version == 2


def train(output_dir: Path) -> dict:
    """Train, and return what rank 0 reports (every rank returns its own view)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false") == "true"
    if fsdp:
        fsdp_on_cpu()
    torch.manual_seed(0)
    model = prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        accelerator_config={"use_configured_state": fsdp},  # keep the state fsdp_on_cpu configured
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=arithmetic_rows(GLOBAL_BATCH * STEPS, SEQ), callbacks=[LossLog()]
    )
    trainer.train()
    weight = trainer.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert isinstance(trainer.model.model.layers[0].self_attn.q_proj.base_layer, LinearNF4)
    result = {
        "world_size": world,
        "fsdp": trainer.is_fsdp_enabled,
        "losses": [loss for _, loss in sorted(logged_losses(trainer).items())],
        "nf4_weight_type": type(weight).__name__,
        "nf4_weight_dtype": str(weight.dtype),
        "nf4_weight_local_shape": list(weight.to_local().shape if hasattr(weight, "to_local") else weight.shape),
    }
    return result


def main() -> None:
    out = Path(sys.argv[1])
    result = train(out.parent / "trainer")
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
