"""Adapter-only checkpoints for ``transformers.Trainer`` and its subclasses (TRL's ``SFTTrainer``, ...).

Trainer writes a checkpoint through ``Trainer._save`` (``model.save_pretrained``: for a :func:`fastllm.prepare_qlora`
model that is the whole model, every NF4 weight and the 16-bit embeddings) and reads it back through
``Trainer._load_from_checkpoint`` / ``Trainer._load_best_model``, which load an adapter alone only for a
``peft.PeftModel`` (``transformers.trainer_utils._is_peft_model`` is an ``isinstance`` check, which a fastllm model
cannot pass without PEFT re-wrapping it). :class:`AdapterCheckpointMixin` overrides those three methods, and only
them, to take Trainer's PEFT path with fastllm's adapter files:

- ``_save`` writes ``adapter_model.safetensors`` and ``adapter_config.json`` with :func:`fastllm.save_adapter`
  (what ``PeftModel.save_pretrained`` writes: ``PeftModel.from_pretrained(dense_base, checkpoint)`` loads it), then
  the processing class and ``training_args.bin`` as ``Trainer._save`` does. No frozen base weight is written.
- ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end=True``) read the adapter back with :func:`fastllm.load_adapter`, where Trainer calls
  ``PeftModel.load_adapter``.

Optimizer, scheduler, gradient-scaler, RNG and trainer state are saved and restored by Trainer itself, untouched;
the optimizer holds only the trainable LoRA A/B matrices, so a run resumed from a checkpoint continues the
uninterrupted run exactly. A model without :class:`~fastllm.LoraLinear` layers takes Trainer's own path, and so do
FSDP and DeepSpeed runs: accelerate saves and loads those as sharded model + optimizer state (``Trainer.save_model``,
``_save_optimizer_and_scheduler``), frozen shards included.

Why a hook on the Trainer and none on the model: Trainer calls a model's ``load_adapter`` only for a ``PeftModel``;
any other model resuming from an adapter-only checkpoint ends in ``load_sharded_checkpoint``, which needs a full-model
index. Making the model's ``save_pretrained`` call :func:`fastllm.save_adapter` (or setting ``_hf_peft_config_loaded``)
would shrink the checkpoints but leave them impossible to resume. Nothing else is needed: Trainer does not refuse a
prepare_qlora model (it has no ``hf_quantizer``, so ``validate_quantization_for_training`` passes; only LoRA A/B
require grad), gradient checkpointing makes the inputs require grad for it (``main_input_name == "input_ids"``), and
SFTTrainer re-wraps a model only when given a ``peft_config``.

Use :class:`Trainer` in place of ``transformers.Trainer``, or put the mixin first in any subclass::

    from fastllm.integrations.trainer import AdapterCheckpointMixin, Trainer
    from trl import SFTTrainer

    class QLoRASFTTrainer(AdapterCheckpointMixin, SFTTrainer):
        pass
"""

from __future__ import annotations

import os

import torch
import transformers
from torch import nn
from transformers.trainer import TRAINING_ARGS_NAME

from fastllm.nn.adapters import ADAPTER_WEIGHTS, load_adapter, lora_layers, save_adapter

__all__ = ["AdapterCheckpointMixin", "Trainer"]


class AdapterCheckpointMixin:
    """Makes a ``transformers.Trainer`` (sub)class checkpoint a fastllm model's LoRA adapter alone, in PEFT format.

    Put it before the Trainer class in the bases (``class T(AdapterCheckpointMixin, SFTTrainer)``). See the module
    docstring for what each overridden method does.
    """

    def _adapter_model(self, model: nn.Module | None = None) -> nn.Module | None:
        # The model under Trainer's wrappers (DDP, torch.compile) when it holds LoraLinear layers, else None (Trainer's
        # own path). Also None under FSDP and DeepSpeed, whose sharded checkpoints accelerate writes and reads itself
        # (the adapter's parameters are shards there, which fastllm.save_adapter cannot write).
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        model = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        return model if lora_layers(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (:func:`fastllm.save_adapter`), the processing class and the training arguments."""
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = self.args.output_dir if output_dir is None else output_dir
        save_adapter(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: load the checkpoint's adapter into the model (:func:`fastllm.load_adapter`)."""
        target = self._adapter_model(model)
        if target is None or not os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: load the best checkpoint's adapter into the model."""
        target = self._adapter_model()
        best = self.state.best_model_checkpoint
        if target is None or not os.path.isfile(os.path.join(best, ADAPTER_WEIGHTS)):
            return super()._load_best_model()
        load_adapter(target, best)


class Trainer(AdapterCheckpointMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints hold a fastllm model's LoRA adapter in PEFT format, and nothing of
    the frozen base (see :class:`AdapterCheckpointMixin`)."""
