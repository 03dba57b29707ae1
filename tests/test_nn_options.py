"""Options of the nn/ API that the per-module tests leave out: prepare_qlora's format and dtype options, the dtype
``merge_and_unload`` produces, ``save_merged`` on a plain (non-transformers) module, and the adapter files
``load_adapter`` / ``save_adapter`` refuse (the model is left unchanged each time)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _metrics import rel_err
from _tiny_models import make_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastllm import LinearNF4, LoraLinear, load_adapter, merge_and_unload, prepare_qlora, save_adapter, save_merged
from fastllm.nf4 import quantize


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def randomize_b(model: nn.Module, seed: int = 0) -> nn.Module:
    """B starts at zero; random B makes the adapters (and what is merged) matter."""
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    return model


def test_prepare_qlora_format_and_dtype_options():
    original = make_model("llama")
    model = prepare_qlora(
        copy.deepcopy(original), r=4, alpha=8, use_rslora=True, compute_dtype=torch.bfloat16,
        blocksize=128, double_quant=False, progress=False,
    )  # fmt: skip
    layers = lora_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        base = layer.base_layer
        assert isinstance(base, LinearNF4) and base.compute_dtype == torch.bfloat16, name
        assert layer.use_rslora and layer.scaling == pytest.approx(8 / math.sqrt(4)), name
        # The bytes of a blocksize-128 quantization without nested statistics of the original weight.
        want = quantize(original.get_submodule(name).weight, 128, double_quant=False)
        w = base.nf4_weight()
        assert w.blocksize == 128 and w.nested_absmax is None and w.offset is None, name
        assert torch.equal(w.data, want.data) and torch.equal(w.absmax, want.absmax), name
        assert base.state_dict()["weight.absmax"].dtype == torch.float32, name
    # compute_dtype: the layers compute in bf16 and hand back the input's dtype.
    hidden = torch.randn(2, 5, 64)
    out = model.model.layers[0].mlp.down_proj(model.model.layers[0].mlp.up_proj(hidden))
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("model_dtype", "compute_dtype", "expected"),
    [
        (torch.float32, None, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float16, torch.float32, torch.float32),
    ],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_dtype_is_compute_dtype_else_weight_dtype(arch, model_dtype, compute_dtype, expected):
    model = randomize_b(
        prepare_qlora(make_model(arch).to(model_dtype), r=4, alpha=8, compute_dtype=compute_dtype, progress=False)
    )
    layers = lora_layers(model)
    want = {}
    for name, layer in layers.items():
        # W' = dequant(W) + scale * B @ A in fp32, cast once.
        merged = layer.base_layer.dequantize(torch.float32) + layer.delta_weight()
        want[name] = merged.to(expected)
    merge_and_unload(model)
    for name, weight in want.items():
        module = model.get_submodule(name)
        assert type(module) is (Conv1D if arch == "gpt2" else nn.Linear), name
        stored = module.weight.t() if arch == "gpt2" else module.weight
        assert stored.dtype == expected and torch.equal(stored, weight), name


def test_save_merged_plain_module(tmp_path):
    """A module without save_pretrained is written as directory/model.safetensors, loadable into the dense twin."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False))
    model = randomize_b(prepare_qlora(copy.deepcopy(dense), r=4, alpha=8, progress=False))
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    assert save_merged(model, tmp_path) == tmp_path
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == {"0.weight", "0.bias", "2.weight"}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    dense.load_state_dict(saved)
    with torch.no_grad():
        assert rel_err(dense(x), expected) < 1e-5


def _save_one(tmp_path, name: str, tensors: dict, config: dict | None) -> str:
    directory = tmp_path / name
    directory.mkdir()
    save_file(tensors, directory / "adapter_model.safetensors")
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return str(directory)


def test_adapter_refusals_leave_model_unchanged(tmp_path):
    model = randomize_b(prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False))
    save_adapter(model, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scalings = {n: layer.scaling for n, layer in lora_layers(model).items()}
    key = next(iter(tensors))
    refused = [
        (_save_one(tmp_path, "prefix", tensors, {**config, "peft_type": "PREFIX_TUNING"}), "peft_type must be 'LORA'"),
        (_save_one(tmp_path, "ranks", tensors, {**config, "rank_pattern": {"q_proj": 8}}), "rank_pattern"),
        (_save_one(tmp_path, "alphas", tensors, {**config, "alpha_pattern": {"q_proj": 2}}), "alpha_pattern"),
        (_save_one(tmp_path, "alpha", tensors, {**config, "lora_alpha": 0}), "lora_alpha must be a finite number > 0"),
        (_save_one(tmp_path, "ints", {**tensors, key: tensors[key].to(torch.int32)}, config), "floating point"),
    ]
    for path, message in refused:
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no adapter_model.safetensors"):
        load_adapter(model, tmp_path / "empty")
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), name
    assert {n: layer.scaling for n, layer in lora_layers(model).items()} == scalings


def test_save_adapter_refuses_mixed_hyperparameters(tmp_path):
    model = prepare_qlora(make_model("llama"), r=4, alpha=8, progress=False)
    layer = model.model.layers[1].self_attn.v_proj
    layer.alpha = 16
    with pytest.raises(ValueError, match=r"self_attn.v_proj has r=4, alpha=16.*same values in every layer"):
        save_adapter(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "adapter_model.safetensors").exists()
