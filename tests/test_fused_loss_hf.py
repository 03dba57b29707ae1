"""use_fused_loss on tiny Llama, Gemma 2 (final logit softcapping), GPT-2 (tied embeddings) and LLaVA models.

The fused loss and the LoRA gradients must equal those of the model's own loss (materialized logits, transformers'
ForCausalLMLoss), with ignored labels, ``num_items_in_batch`` and ``shift_labels``; without labels the model is
unchanged.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from _metrics import rel_err
from _tiny_models import VOCAB, make_batch, make_model, tiny_config
from torch import nn

from fastllm import LinearNF4, LoraLinear, prepare_qlora
from fastllm.integrations.loss import remove_fused_loss, use_fused_loss

ARCHS = ("llama", "gemma2", "gpt2", "llava")
# Gemma 2 with a small cap and larger weights, so the softcapping visibly changes the loss.
OVERRIDES = {"gemma2": {"final_logit_softcapping": 1.0, "initializer_range": 0.3}}


def qlora_model(arch: str, device) -> nn.Module:
    """The tiny model with LoRA (r=4) on every linear layer, its B matrices random so that A gets gradients too."""
    model = prepare_qlora(make_model(arch, **OVERRIDES.get(arch, {})), r=4, alpha=8, progress=False).to(device)
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.1)
    return model


def batch_for(arch: str, device) -> dict[str, torch.Tensor]:
    batch = make_batch(arch, batch=2, seq=11)
    batch["labels"][0, :3] = -100  # a prompt that is not trained on
    batch["labels"][1, 5] = -100
    return {k: v.to(device) for k, v in batch.items()}


def loss_and_grads(model: nn.Module, batch: dict, **extra) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, out


@pytest.mark.parametrize(
    "extra", [{}, {"num_items_in_batch": 9}, {"shift_labels": True}], ids=["mean", "num_items", "shift_labels"]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_lora_grads(device, arch, extra):
    model = qlora_model(arch, device)
    batch = batch_for(arch, device)
    if extra.get("shift_labels"):  # given pre-shifted labels, ForCausalLMLoss uses them as they are
        extra = {"shift_labels": torch.roll(batch["labels"], -1, dims=1)}
    if "num_items_in_batch" in extra:
        extra = {"num_items_in_batch": torch.tensor(extra["num_items_in_batch"], device=device)}
    ref_loss, ref_grads, ref_out = loss_and_grads(model, batch, **extra)
    assert ref_out.logits is not None

    use_fused_loss(model)
    loss, grads, out = loss_and_grads(model, batch, **extra)
    assert out.logits is None and "logits" not in out and out["loss"] is out.loss and out.to_tuple()[0] is out.loss
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 1e-5, f"loss {loss.item()} vs {ref_loss.item()}"
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, f"{name}: rel err {rel_err(g, ref_grads[name]):.2e}"

    # Without labels: the model's logits as before; after remove_fused_loss: its own loss and logits again.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        fused_logits = model(**inputs).logits
        remove_fused_loss(model)
        plain = model(**batch, **extra)
    assert fused_logits.shape[-1] == VOCAB and torch.equal(fused_logits, plain.logits)
    assert torch.equal(plain.loss, ref_loss)


def test_gemma2_softcap_is_applied(device):
    """The probe finds Gemma 2's cap: the fused loss matches with it and differs clearly from the uncapped loss."""
    model = qlora_model("gemma2", device)
    batch = batch_for("gemma2", device)
    use_fused_loss(model)
    with torch.no_grad():
        capped = model(**batch).loss
    assert model._fastllm_fused_loss.softcap == pytest.approx(1.0)
    remove_fused_loss(model)
    model.config.final_logit_softcapping = None
    with torch.no_grad():
        uncapped = model(**batch).loss
    assert rel_err(capped, uncapped) > 1e-2


def test_tied_head_gets_gradient(device):
    """GPT-2's lm_head is the token embedding: a trainable tied head gets the same gradient fused and not."""
    model = make_model("gpt2").to(device)
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = batch_for("gpt2", device)
    ref_loss, ref_grads, _ = loss_and_grads(model, batch)
    use_fused_loss(model)
    loss, grads, _ = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    name = "transformer.wte.weight"
    assert rel_err(grads[name], ref_grads[name]) < 1e-4


def test_nf4_head(device):
    """A LinearNF4 head: the loss of its dequantized weight, and LoRA gradients as with the model's own loss."""
    model = qlora_model("llama", device)
    model.lm_head = LinearNF4.from_linear(model.lm_head).to(device)
    batch = batch_for("llama", device)
    ref_loss, ref_grads, _ = loss_and_grads(model, batch)
    use_fused_loss(model)
    loss, grads, _ = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, name


def test_refuses_what_it_cannot_reproduce(device):
    """A replaced loss_function is refused at the call; a LoRA-adapted head when use_fused_loss is applied."""
    model = make_model("llama").to(device)
    batch = batch_for("llama", device)
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    use_fused_loss(model)
    with pytest.raises(ValueError, match="loss_function"):
        model(**batch)
    model = make_model("llama")
    model.lm_head = LoraLinear.from_linear(model.lm_head, 4, 8)
    with pytest.raises(TypeError, match="output embeddings"):
        use_fused_loss(model)


class _ScaledLlama(T.LlamaForCausalLM):
    """A model that doubles its logits after the head (a processing the fused loss does not reproduce)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_refuses_unknown_logit_processing(device):
    """Logits changed after the head other than by a softcap: refused, not trained on a different loss."""
    model = _ScaledLlama._from_config(tiny_config("llama")).to(device)
    use_fused_loss(model)
    with pytest.raises(ValueError, match="changes its logits"):
        model(**batch_for("llama", device))
