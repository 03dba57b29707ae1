"""PEFT-format adapters (both directions), merge_and_unload / save_merged, and bad adapter files."""

import copy
import json

import pytest
import torch
import transformers as T
from _metrics import rel_err
from _tiny_models import logits, make_batch, make_model, with_dequantized_weights
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastllm import LoraLinear, load_adapter, merge_and_unload, prepare_qlora, save_adapter, save_merged


def prepared(arch: str, seed: int = 0) -> nn.Module:
    """A prepared tiny model whose B matrices are random (so adapters change the output)."""
    model = prepare_qlora(make_model(arch), r=4, alpha=8, progress=False)
    torch.manual_seed(seed + 100)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            nn.init.normal_(module.lora_B, std=0.05)
    return model


def test_round_trip_exact(tmp_path):
    model = prepared("llama")
    save_adapter(model, tmp_path)
    fresh = prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False)
    load_adapter(fresh, tmp_path)
    ours = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, ours[name]), name
    batch = make_batch("llama")
    assert torch.equal(logits(fresh, batch), logits(model, batch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_ours(tmp_path, arch):
    model = prepared(arch)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    peft_model = PeftModel.from_pretrained(with_dequantized_weights(make_model(arch), model), tmp_path)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert theirs.keys() == ours.keys()  # the same layers adapted, nothing else
    for name, layer in ours.items():
        assert torch.equal(theirs[name].lora_A["default"].weight, layer.lora_A), name
        assert torch.equal(theirs[name].lora_B["default"].weight, layer.lora_B), name
    batch = make_batch(arch)
    assert rel_err(logits(peft_model, batch), logits(model, batch)) < 1e-5


def test_we_load_peft(tmp_path):
    model = prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False)
    targets = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=targets, init_lora_weights="gaussian")
    peft_model = get_peft_model(with_dequantized_weights(make_model("llama"), model), config)
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    peft_model.save_pretrained(tmp_path)
    load_adapter(model, tmp_path)
    assert all(m.alpha == 16 and m.use_rslora for m in model.modules() if isinstance(m, LoraLinear))
    batch = make_batch("llama")
    assert rel_err(logits(model, batch), logits(peft_model, batch)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_save_merged(tmp_path, arch):
    model = prepared(arch)
    batch = make_batch(arch)
    expected = logits(model, batch)
    merged = merge_and_unload(copy.deepcopy(model))
    kind = Conv1D if arch == "gpt2" else nn.Linear
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert all(type(merged.get_submodule(n)) is kind for n in names)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert rel_err(logits(merged, batch), expected) < 1e-5
    save_merged(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(logits(reloaded, batch), expected) < 1e-5


def test_bad_adapters_leave_model_unchanged(tmp_path):
    model = prepared("llama")
    save_adapter(model, tmp_path / "good")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"

    def write(name: str, content: dict) -> str:
        (tmp_path / name).mkdir()
        save_file(content, tmp_path / name / "adapter_model.safetensors")
        return str(tmp_path / name)

    wrong_shape = write("shape", {**tensors, key: torch.zeros(5, 64)})
    with pytest.raises(ValueError, match=r"up_proj.lora_A.weight' has shape \(5, 64\), the model needs \(4, 64\)"):
        load_adapter(model, wrong_shape)
    extra = write("extra", {**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="unexpected key 'base_model.model.lm_head.lora_A.weight'"):
        load_adapter(model, extra)
    missing = write("missing", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        load_adapter(model, missing)
    (tmp_path / "pickle").mkdir()
    torch.save(tensors, tmp_path / "pickle" / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle checkpoints are refused"):
        load_adapter(model, tmp_path / "pickle")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_adapter(model, tmp_path / "pickle" / "adapter_model.bin")
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), name
    with pytest.raises(ValueError, match="holds no LoraLinear"):
        save_adapter(make_model("llama"), tmp_path / "none")
    bare = LoraLinear.from_linear(nn.Linear(64, 32), r=4)  # a layer has no path: its keys would be ill-formed
    for call in (save_adapter, load_adapter):
        with pytest.raises(ValueError, match="model is itself a LoraLinear"):
            call(bare, tmp_path / "good")
    with pytest.raises(ValueError, match="model is itself a LoraLinear"):
        merge_and_unload(bare)
    assert [name for name, _ in bare.named_children()] == ["base_layer"]  # no stray "" child was attached
