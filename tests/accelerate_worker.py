"""Launched by tests/test_accelerate.py under ``accelerate launch`` (FSDP2, gloo, 2 CPU processes with 2 sequences
each): fastllm's Trainer on the tiny prepare_qlora'd Llama. Rank 0 writes the logged per-step losses, the final
model's logits on a fixed batch and what became of one NF4 weight to the JSON file named by argv[1]. The test calls
:func:`train` in its own process (4 sequences) for the single-process reference.

With ``checkpoint`` as argv[2], for each FSDP ``state_dict_type`` (the launch config's first) the run checkpoints
every ``SAVE_EVERY`` steps (``<dir of argv[1]>/<state_dict_type>/trainer/checkpoint-N``) and the same processes then
train a second model, its adapter drawn from another seed, resumed from the mid checkpoint; the losses and final
logits of both runs go under ``<state_dict_type>`` (those of the second under ``"resumed"``), with the first
model's logits after ``_load_best_model`` loaded the mid checkpoint (``"best_logits"``).

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
from _tiny_models import VOCAB, logits, make_model  # noqa: E402

from fastllm import LinearNF4, prepare_qlora  # noqa: E402
from fastllm.integrations.trainer import Trainer  # noqa: E402

STEPS, SAVE_EVERY, SEQ, GLOBAL_BATCH = 4, 2, 16, 4
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")  # what accelerate's FSDP plugin saves


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


def use_state_dict_type(state_dict_type: str) -> None:
    """Make the process state's FSDP2 plugin (what Trainer's Accelerator uses) save ``state_dict_type`` checkpoints
    (a fresh plugin: an existing one keeps the state-dict configs of its first type)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin(state_dict_type=state_dict_type)


def is_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false") == "true"


def train(output_dir: Path, adapter_seed: int = 0, save: bool = False, resume_from: Path | None = None) -> Trainer:
    """Train a fresh model for STEPS steps (``save``: checkpoint every SAVE_EVERY; ``resume_from``: from there)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = make_model("llama")
    torch.manual_seed(adapter_seed)
    model = prepare_qlora(model, r=4, alpha=8, progress=False)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        accelerator_config={"use_configured_state": is_fsdp()},  # keep the state fsdp_on_cpu configured
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=arithmetic_rows(GLOBAL_BATCH * STEPS, SEQ), callbacks=[LossLog()]
    )
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return trainer


def batch_logits(trainer: Trainer) -> list:
    """The model's logits on a fixed batch (collective under FSDP2: every rank runs the forward on the same batch)."""
    g = torch.Generator().manual_seed(7)
    return logits(trainer.model.eval(), {"input_ids": torch.randint(1, VOCAB, (2, 11), generator=g)}).tolist()


def final_state(trainer: Trainer) -> dict:
    """The run's logged losses and its model's logits on the fixed batch."""
    return {
        "losses": {step: loss for step, loss in sorted(logged_losses(trainer).items())},
        "logits": batch_logits(trainer),
    }


def train_and_resume(run_dir: Path) -> tuple[Trainer, dict]:
    """Train with checkpoints (``run_dir/trainer/checkpoint-N``), then train a model whose adapter starts elsewhere
    resumed from the mid checkpoint (``run_dir/resumed``). Returns the first trainer and both runs' final states, and
    (``"best_logits"``) the first model's logits after ``_load_best_model`` rewound it to the mid checkpoint."""
    trainer = train(run_dir / "trainer", save=True)
    mid = run_dir / "trainer" / f"checkpoint-{SAVE_EVERY}"
    resumed = train(run_dir / "resumed", adapter_seed=1, resume_from=mid)
    record = {**final_state(trainer), "resumed": final_state(resumed)}
    trainer.state.best_model_checkpoint = str(mid)  # what load_best_model_at_end=True runs after training
    trainer._load_best_model()
    return trainer, {**record, "best_logits": batch_logits(trainer)}


def main() -> None:
    out = Path(sys.argv[1])
    checkpoint = sys.argv[2:] == ["checkpoint"]
    if is_fsdp():
        fsdp_on_cpu()
    result = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if checkpoint:  # first with the launch config's state dict type
        state_dict_type = str(os.environ["FSDP_STATE_DICT_TYPE"])
        trainer, result[state_dict_type] = train_and_resume(out.parent / state_dict_type)
    else:
        trainer = train(out.parent / "trainer")
    weight = trainer.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert isinstance(trainer.model.model.layers[0].self_attn.q_proj.base_layer, LinearNF4)
    result |= {
        "fsdp": trainer.is_fsdp_enabled,
        **final_state(trainer),
        "nf4_weight_type": type(weight).__name__,
        "nf4_weight_dtype": str(weight.dtype),
        "nf4_weight_local_shape": list(weight.to_local().shape if hasattr(weight, "to_local") else weight.shape),
    }
    if checkpoint:  # then with the other one (in the same processes: no second launch)
        other = next(t for t in STATE_DICT_TYPES if t != state_dict_type)
        use_state_dict_type(other)
        _, result[other] = train_and_resume(out.parent / other)
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
