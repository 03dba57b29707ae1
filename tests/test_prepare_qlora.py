"""prepare_qlora on tiny random-init BERT, Llama, GPT-2, Gemma 2 and LLaVA models, on every device (the ``device``
fixture); in bf16 against PEFT over the same model in fp32 with the dequantized weights."""

import copy

import pytest
import torch
from _metrics import rel_err
from _tiny_models import ARCHS, bnb_linear4bit, logits, make_batch, make_model, with_dequantized_weights
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastllm import LinearNF4, LoraLinear, prepare_qlora
from fastllm.nn.prepare import find_targets


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a Conv1D."""
    return (module.nx, module.nf) if isinstance(module, Conv1D) else (module.in_features, module.out_features)


def on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_qlora_model(device, arch):
    original = make_model(arch)
    model = copy.deepcopy(original)
    batch = on(device, make_batch(arch))
    targets = find_targets(model)
    shapes = {name: features(model.get_submodule(name)) for name in targets}
    prepare_qlora(model, r=4, alpha=8, progress=False)
    model.to(device)

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
    twin = with_dequantized_weights(copy.deepcopy(original), model).to(device)
    assert rel_err(logits(model, batch), logits(twin, batch)) < {"cpu": 1e-5, "cuda": 5e-5}[device.type]

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


# What a bf16 model may differ from its fp32 reference by (bf16 rounding of activations, weights and outputs): the
# loss; all LoRA gradients as one vector; the worst single gradient (small ones carry more relative noise).
BF16_MODEL_TOL = {"loss": 1e-3, "lora_grads": 3e-2, "worst_lora_grad": 1e-1}


def bf16_model_errors(arch: str, device: torch.device, model_dtype: torch.dtype = torch.bfloat16, **options) -> dict:
    """A tiny ``arch`` model in ``model_dtype`` prepared by ``prepare_qlora(**options)`` (r=4, alpha=8, random B) on
    ``device``, against PEFT (same A and B) over the same model in fp32 whose linears hold the dequantized NF4
    weights: rel errors of the loss and the largest over the LoRA gradients (tests/test_cpu_path.py runs this too).

    Both sides start from the parameters rounded to bf16, so only the computation differs. Eval mode (no dropout).
    """
    dense = make_model(arch).to(torch.bfloat16).float()
    model = prepare_qlora(copy.deepcopy(dense).to(model_dtype), r=4, alpha=8, progress=False, **options)
    torch.manual_seed(5)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.1)
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=options.get("use_rslora", False), target_modules=list(layers),
        fan_in_fan_out=arch == "gpt2", lora_dropout=0.0,
    )  # fmt: skip
    reference = get_peft_model(with_dequantized_weights(copy.deepcopy(dense), model), config)
    theirs = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    for name, layer in layers.items():
        theirs[name].lora_A["default"].weight.data = layer.lora_A.detach().clone()
        theirs[name].lora_B["default"].weight.data = layer.lora_B.detach().clone()
    batch = on(device, make_batch(arch))
    losses = []
    for net in (model.to(device).eval(), reference.to(device).eval()):
        loss = net(**batch).loss
        loss.backward()
        losses.append(loss)
    ours, ref = [], []
    for name, layer in layers.items():
        ours += [layer.lora_A.grad, layer.lora_B.grad]
        ref += [theirs[name].lora_A["default"].weight.grad, theirs[name].lora_B["default"].weight.grad]
    return {
        "loss": rel_err(losses[0], losses[1]),
        "lora_grads": rel_err(torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in ref])),
        "worst_lora_grad": max(rel_err(o, r) for o, r in zip(ours, ref, strict=True)),
        "n_grads": len(ours),
    }


BF16_MODEL_CASES = {
    "llama": ("llama", {}),
    "gemma2": ("gemma2", {}),
    "gpt2": ("gpt2", {}),
    "llama-fp32-compute_bf16-rslora-blocksize128-no-double-quant": (
        "llama", {"model_dtype": torch.float32, "compute_dtype": torch.bfloat16, "use_rslora": True,
                  "blocksize": 128, "double_quant": False},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BF16_MODEL_CASES))
def test_bf16_model_loss_and_lora_grads_vs_fp32_reference(device, case):
    arch, options = BF16_MODEL_CASES[case]
    errors = bf16_model_errors(arch, device, **options)
    assert errors["n_grads"] == (16 if arch == "gpt2" else 28)
    for name, tol in BF16_MODEL_TOL.items():
        assert errors[name] < tol, f"{name}: rel err {errors[name]:.2e}"


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
def test_hf_gradient_checkpointing_same_grads(device, use_reentrant):
    grads = []
    for ckpt in (False, True):
        model = prepare_qlora(make_model("llama"), r=4, dropout=0.1, progress=False).to(device)
        for module in model.modules():
            if isinstance(module, LoraLinear):
                nn.init.normal_(module.lora_B, std=0.1)
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        model.train()
        torch.manual_seed(3)
        model(**on(device, make_batch("llama"))).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None and rel_err(grads[1][name], g) < 1e-6, name


def test_bitsandbytes_model_converted_reusing_bytes():
    bnb = pytest.importorskip("bitsandbytes")  # the GPU machines may not have it
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
