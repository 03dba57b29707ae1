"""TRL's SFTTrainer trains a fastllm (prepare_qlora) model: no PEFT wrapping, the loss falls, only the adapter moves.

No network: the tokenizer is a WordLevel ``tokenizers`` model built here over a small closed vocabulary, and the
dataset is plain text that SFTTrainer tokenizes itself. TRL's defaults stay on (bf16 autocast, gradient checkpointing,
its fused LM-head loss), and the checkpoint written by ``save_model`` holds the adapter alone.
"""

from __future__ import annotations

import pytest
import torch
from _hf_training import LossLog, logged_losses, plain_cpu_path
from _tiny_models import VOCAB, make_model
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fastllm import LoraLinear, prepare_qlora
from fastllm.integrations.trainer import AdapterCheckpointMixin
from fastllm.nn.adapters import ADAPTER_WEIGHTS

trl = pytest.importorskip("trl")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
STEPS = 8


class QLoRASFTTrainer(AdapterCheckpointMixin, trl.SFTTrainer):
    """SFTTrainer with adapter-only checkpoints (the pattern the mixin documents)."""


@pytest.fixture(scope="module", autouse=True)
def _cpu_path():
    with plain_cpu_path():
        yield


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer over WORDS plus <pad>, <unk>, <eos> (ids 0, 1, 2), built offline."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def counting_texts(n: int = 32, seed: int = 0) -> list[str]:
    """Runs of consecutive number words ("three four five ..."), of varying start and length: learnable."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        start = int(torch.randint(0, 4, (1,), generator=g))
        length = int(torch.randint(6, 10, (1,), generator=g))
        texts.append(" ".join(WORDS[start : start + length]))
    return texts


def test_sft_trainer_trains_a_fastllm_model(tmp_path):
    model = prepare_qlora(make_model("llama"), r=8, alpha=16, progress=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    adapter_start = {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        max_length=16,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    assert config.bf16 and config.gradient_checkpointing  # TRL's defaults, kept on
    trainer = QLoRASFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": counting_texts()}),
        processing_class=word_tokenizer(),
        callbacks=[LossLog()],
    )
    assert trainer.model is model  # not re-wrapped (no PeftModel, no prepare_model_for_kbit_training)
    trainer.train()

    losses = logged_losses(trainer)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # The frozen head (init std 0.02) keeps the logits small, so the loss falls slowly from ln(96) = 4.56 in nats;
    # step-to-step noise of an untrained adapter is ~0.05. Demand a fall of 0.25 nats between the first and last pairs.
    first, last = (losses[1] + losses[2]) / 2, (losses[STEPS - 1] + losses[STEPS]) / 2
    assert last < first - 0.25, losses
    state = model.state_dict()
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 2 * 7
    for key, value in frozen.items():
        assert torch.equal(state[key], value), key  # the NF4 base, embeddings, norms and head stay frozen
    assert all(not torch.equal(state[k], v) for k, v in adapter_start.items())  # every LoRA matrix trained

    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / ADAPTER_WEIGHTS)
    assert len(saved) == len(adapter_start)
    assert not (tmp_path / "final" / "model.safetensors").exists()
