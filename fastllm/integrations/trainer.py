"""Adapter-only checkpoints for ``transformers.Trainer`` and its subclasses (TRL's ``SFTTrainer``, ...), in one
process, under DDP and under accelerate's FSDP2.

Trainer writes a checkpoint through ``Trainer.save_model`` and reads it back through
``Trainer._load_from_checkpoint`` / ``Trainer._load_best_model``, which load an adapter alone only for a
``peft.PeftModel`` (``transformers.trainer_utils._is_peft_model`` is an ``isinstance`` check, which a fastllm model
cannot pass without PEFT re-wrapping it). Otherwise the whole model is written: in one process and under DDP
``Trainer._save`` (``model.save_pretrained``: for a :func:`fastllm.prepare_qlora` model every NF4 weight and the
16-bit embeddings); under FSDP ``_save_optimizer_and_scheduler`` with accelerate's ``save_fsdp_model``
(``pytorch_model_fsdp_0/`` or ``pytorch_model_fsdp.bin``, through ``torch.distributed.checkpoint``, which maps the
NF4 layers' bitsandbytes-format keys through ``LinearNF4._fqn_modifiers``). :class:`AdapterCheckpointMixin` overrides
those methods to take Trainer's PEFT path with fastllm's adapter files:

- ``_save`` writes ``adapter_model.safetensors`` and ``adapter_config.json`` with :func:`fastllm.save_adapter`
  (what ``PeftModel.save_pretrained`` writes: ``PeftModel.from_pretrained(dense_base, checkpoint)`` loads it), then
  the processing class and ``training_args.bin`` as ``Trainer._save`` does. No frozen base weight is written.
- ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end=True``) read the adapter back with :func:`fastllm.load_adapter`, where Trainer calls
  ``PeftModel.load_adapter``.
- Under FSDP2 (``accelerate launch`` with ``fsdp_version: 2``) the same files are written and read collectively:
  ``save_model`` gathers the sharded LoRA A/B whole and rank 0 writes them
  (:func:`fastllm.nn.checkpoint.save_adapter_distributed`); loading reads the adapter on every rank, each keeping
  its shard (:func:`~fastllm.nn.checkpoint.load_adapter_distributed`: the checkpoint directory must be visible to
  every rank, as accelerate's sharded optimizer checkpoint already requires). ``_save_optimizer_and_scheduler``
  writes the optimizer and the scheduler as Trainer does under FSDP (accelerate's ``save_fsdp_optimizer``:
  ``optimizer_0/``, sharded, or ``optimizer.bin`` with ``FULL_STATE_DICT``) but not accelerate's whole-model
  ``pytorch_model_fsdp_0/``; Trainer's ``_load_optimizer_and_scheduler`` reads them back unchanged. Both
  ``fsdp_state_dict_type`` values give the same adapter files. Every rank must call ``save_model`` (as Trainer's
  checkpointing does), as for any FSDP model.

Optimizer, scheduler, gradient-scaler, RNG and trainer state are saved and restored by Trainer itself (under FSDP2
the optimizer through accelerate, as above); the optimizer holds only the trainable LoRA A/B matrices, so a run
resumed from a checkpoint continues the uninterrupted run exactly. Trainer's own whole-model path is kept for a
model without :class:`~fastllm.LoraLinear` layers, for FSDP1 (``fsdp_version: 1``: its flat parameters hold the
LoRA weights as slices, which fastllm's adapter gathering does not handle; untested) and for DeepSpeed (untested:
DeepSpeed is not a dependency). A checkpoint written by Trainer's own path (no ``adapter_model.safetensors``) is
still resumed by Trainer's own code.

Why a hook on the Trainer and none on the model: Trainer calls a model's ``load_adapter`` only for a ``PeftModel``;
any other model resuming from an adapter-only checkpoint ends in ``load_sharded_checkpoint`` (under FSDP:
``load_fsdp_model``), which needs the whole model's files. Making the model's ``save_pretrained`` call
:func:`fastllm.save_adapter` (or setting ``_hf_peft_config_loaded``) would shrink the checkpoints but leave them
impossible to resume. Nothing else is needed: Trainer does not refuse a prepare_qlora model (it has no
``hf_quantizer``, so ``validate_quantization_for_training`` passes; only LoRA A/B require grad), gradient
checkpointing makes the inputs require grad for it (``main_input_name == "input_ids"``), and SFTTrainer re-wraps a
model only when given a ``peft_config``.

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
from accelerate.utils import save_fsdp_optimizer
from torch import nn
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME

from fastllm.nn.adapters import ADAPTER_WEIGHTS, load_adapter, lora_layers, save_adapter
from fastllm.nn.checkpoint import load_adapter_distributed, save_adapter_distributed

__all__ = ["AdapterCheckpointMixin", "Trainer"]


class AdapterCheckpointMixin:
    """Makes a ``transformers.Trainer`` (sub)class checkpoint a fastllm model's LoRA adapter alone, in PEFT format,
    in one process, under DDP and under accelerate's FSDP2.

    Put it before the Trainer class in the bases (``class T(AdapterCheckpointMixin, SFTTrainer)``). See the module
    docstring for what each overridden method does.
    """

    def _adapter_model(self, model: nn.Module | None = None) -> nn.Module | None:
        # The model under Trainer's wrappers (DDP, torch.compile; an FSDP2 model is its own module) when it holds
        # LoraLinear layers, else None (Trainer's own path). Also None under DeepSpeed and FSDP1, whose wrappers
        # flatten the parameters: there Trainer's own checkpoints are kept.
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self._fsdp2):
            return None
        model = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        return model if lora_layers(model) else None

    @property
    def _fsdp2(self) -> bool:
        # accelerate FSDP2: the LoRA weights are DTensor shards, saved and loaded collectively.
        return self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2

    def _load_adapter(self, model: nn.Module, checkpoint: str) -> None:
        (load_adapter_distributed if self._fsdp2 else load_adapter)(model, checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2, write the adapter (collective: call it on every rank); elsewhere ``Trainer.save_model``,
        which calls :meth:`_save`."""
        if not self._fsdp2 or self._adapter_model() is None:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (:func:`fastllm.save_adapter`; under FSDP2 gathered, collectively, and written by rank 0),
        the processing class and the training arguments."""
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if self._fsdp2:
            save_adapter_distributed(model, output_dir)
        elif self.args.should_save:
            save_adapter(model, output_dir)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP2, the optimizer (accelerate's ``save_fsdp_optimizer``, collective) and the scheduler, without
        the whole-model shards Trainer writes with them there; elsewhere Trainer's own."""
        if not self._fsdp2 or self._adapter_model() is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: load the checkpoint's adapter into the model (:func:`fastllm.load_adapter`; under FSDP2 every
        rank reads it and keeps its shard)."""
        target = self._adapter_model(model)
        if target is None or not os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_adapter(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: load the best checkpoint's adapter into the model."""
        target = self._adapter_model()
        best = self.state.best_model_checkpoint
        if target is None or not os.path.isfile(os.path.join(best, ADAPTER_WEIGHTS)):
            return super()._load_best_model()
        self._load_adapter(target, best)


class Trainer(AdapterCheckpointMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints hold a fastllm model's LoRA adapter in PEFT format, and nothing of
    the frozen base (see :class:`AdapterCheckpointMixin`)."""
