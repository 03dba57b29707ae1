"""prepare_qlora on tiny random-init BERT, Llama, GPT-2, Gemma 2 and LLaVA models."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from _metrics import rel_err
from _tiny_models import ARCHS, bnb_linear4bit, logits, make_batch, make_model, with_dequantized_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastllm import LinearNF4, LoraLinear, prepare_qlora
from fastllm.nn.prepare import find_targets


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a Conv1D."""
    return (module.nx, module.nf) if isinstance(module, Conv1D) else (module.in_features, module.out_features)


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_qlora_model(arch):
    original = make_model(arch)
    model = copy.deepcopy(original)
    batch = make_batch(arch)
    targets = find_targets(model)
    shapes = {name: features(model.get_submodule(name)) for name in targets}
    prepare_qlora(model, r=4, alpha=8, progress=False)

    # Only LoRA matrices train, and exactly r * (in + out) of them per replaced layer.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (i + o) for i, o in shapes.values())
    assert {n for n, m in model.named_modules() if isinstance(m, LoraLinear)} == set(targets)
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())
    if arch == "llava":  # vision tower and projector stay dense
        assert all("vision_tower" not in n and "multi_modal_projector" not in n for n in targets)
        assert isinstance(model.model.multi_modal_projector.linear_1, nn.Linear)
    if arch == "gpt2":
        assert all(model.get_submodule(n).fan_in_fan_out for n in targets)

    # NF4 storage: about 0.516 bytes per weight with blocksize 64 and double quantization.
    bases = [m for m in model.modules() if isinstance(m, LinearNF4)]
    per_param = sum(m.nbytes for m in bases) / sum(m.in_features * m.out_features for m in bases)
    assert 0.515 < per_param < 0.518

    # At init (B = 0) the model equals the same model with dequantized dense weights.
    twin = with_dequantized_weights(copy.deepcopy(original), model)
    assert rel_err(logits(model, batch), logits(twin, batch)) < 1e-5

    # Training the adapters lowers the loss.
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_target_modules_suffix_regex_and_skip():
    model = make_model("llama")
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert find_targets(model, r"model\.layers\.1\.mlp\..*") == [
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert find_targets(model, ["q_proj"], skip_modules=["layers.0"]) == ["model.layers.1.self_attn.q_proj"]
    llava = make_model("llava")
    assert any("vision_tower" in n for n in find_targets(llava, skip_modules=()))


def snapshot(model: nn.Module) -> tuple:
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (grad, value) in params.items():
        assert grad == before[1][name][0] and torch.equal(value, before[1][name][1]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r .LoRA rank. must be a positive integer"),
        ({"alpha": -1.0}, "alpha .LoRA alpha. must be a number > 0"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
        ({"target_modules": ["qproj"]}, r"matched no module; linear layers in the model: \['model.layers.0.self_attn"),
        ({"blocksize": 100}, "blocksize must be one of"),
    ],
)
def test_bad_input_leaves_model_unchanged(kwargs, message):
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        prepare_qlora(model, progress=False, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("layer", [nn.Linear(64, 32), Conv1D(32, 64)])
def test_bare_linear_is_refused_unchanged(layer):
    """A model that is itself a linear layer cannot be replaced in place: a clear error, not a silent no-op."""
    before = snapshot(layer)
    with pytest.raises(TypeError, match="model is itself a linear layer"):
        prepare_qlora(layer, progress=False)
    assert_unchanged(layer, before)
    assert find_targets(layer) == []


def test_failure_half_way_leaves_model_unchanged():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")  # quantizing the last target fails
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        prepare_qlora(model, progress=False)
    modules, params = snapshot(model)
    assert modules == before[0]
    assert all(params[n][0] == before[1][n][0] for n in params)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_same_grads(use_reentrant):
    grads = []
    for ckpt in (False, True):
        model = prepare_qlora(make_model("llama"), r=4, dropout=0.1, progress=False)
        for module in model.modules():
            if isinstance(module, LoraLinear):
                nn.init.normal_(module.lora_B, std=0.1)
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        model.train()
        torch.manual_seed(3)
        model(**make_batch("llama")).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None and rel_err(grads[1][name], g) < 1e-6, name


def test_bitsandbytes_model_converted_reusing_bytes():
    model = make_model("llama")  # its decoder linears become bitsandbytes nf4 Linear4bit, quantized on the CPU
    for name in find_targets(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(model.get_submodule(name)))
    batch = make_batch("llama")
    expected = logits(model, batch)
    bnb_layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(bnb_layers) == 14  # 7 linears in each of the 2 decoder layers
    pointers = {n: (m.weight.data_ptr(), m.weight.quant_state.absmax.data_ptr()) for n, m in bnb_layers.items()}
    prepare_qlora(model, r=4, progress=False)
    for name, (weight_ptr, absmax_ptr) in pointers.items():
        base = model.get_submodule(name).base_layer
        assert isinstance(base, LinearNF4)
        assert base.weight.data_ptr() == weight_ptr and base.absmax.data_ptr() == absmax_ptr
    assert rel_err(logits(model, batch), expected) < 1e-5


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target_modules": None}, TypeError, "target_modules must be 'all-linear', a regex string or a list of str"),
        ({"target_modules": 3}, TypeError, "target_modules must be"),
        ({"target_modules": ["q_proj", None]}, TypeError, "target_modules must be"),
        ({"target_modules": "q_proj("}, ValueError, "target_modules 'q_proj\\(' is not a valid regular expression"),
        ({"skip_modules": "vision_tower"}, TypeError, "skip_modules must be None or a list of module names"),
        ({"skip_modules": [1]}, TypeError, "skip_modules must be None or a list"),
        ({"alpha": float("inf")}, ValueError, "alpha .LoRA alpha. must be a number > 0 .finite."),
        ({"alpha": float("nan")}, ValueError, "alpha .LoRA alpha. must be a number > 0 .finite."),
        ({"use_rslora": "false"}, TypeError, "use_rslora must be a bool"),
        ({"double_quant": "yes"}, TypeError, "double_quant must be a bool"),
        ({"compute_dtype": torch.int8}, TypeError, "compute_dtype must be None, torch.float32, torch.float16 or"),
        ({"compute_dtype": "bfloat16"}, TypeError, "compute_dtype must be None, torch.float32, torch.float16 or"),
    ],
)
def test_mistyped_and_non_finite_arguments_leave_model_unchanged(kwargs, error, message):
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        prepare_qlora(model, progress=False, **kwargs)
    assert_unchanged(model, before)


def test_second_prepare_says_already_prepared():
    model = prepare_qlora(make_model("llama"), r=4, progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model is already prepared: it holds 14 LoraLinear layers \(model.layers.0"):
        prepare_qlora(model, progress=False)
    with pytest.raises(ValueError, match="model is already prepared"):
        prepare_qlora(model, target_modules=["q_proj"], progress=False)
    assert_unchanged(model, before)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = make_model("llama")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight is on the meta device"):
        prepare_qlora(model, progress=False)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
