"""LoraLinear against PEFT's LoRA layer over the dequantized weight and the fp64 reference: outputs and gradients of x,
A and B, on every device (the ``device`` fixture), in fp32 and bf16."""

import math

import pytest
import torch
from _metrics import rel_err
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from fastllm import LinearNF4, LoraLinear, reference

# fp32 layers against fp32/fp64 references: the CPU paths sum in one order, CUDA in tiles (tighter than any bug).
FP32_TOL = {"cpu": 1e-6, "cuda": 1e-5}
BF16_TOL = 2e-2


class Wrapper(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def peft_twin(ours: LoraLinear, conv1d: bool = False) -> tuple[nn.Module, nn.Module]:
    """A PEFT LoRA model over a dense layer holding our base weight, with our A and B copied in."""
    base = ours.base_layer
    weight = base.dequantize(torch.float32) if isinstance(base, LinearNF4) else base.weight.detach()
    if conv1d:
        dense = Conv1D(ours.out_features, ours.in_features)
        dense.weight.data = weight.t().contiguous()
    else:
        dense = nn.Linear(ours.in_features, ours.out_features, bias=base.bias is not None)
        dense.weight.data = weight.clone()
    if base.bias is not None:
        dense.bias.data = base.bias.detach().clone()
    config = LoraConfig(
        r=ours.r,
        lora_alpha=ours.alpha,
        lora_dropout=ours.dropout,
        use_rslora=ours.use_rslora,
        target_modules=["layer"],
        fan_in_fan_out=conv1d,
    )
    model = get_peft_model(Wrapper(dense), config)
    layer = model.base_model.model.layer
    layer.lora_A["default"].weight.data = ours.lora_A.detach().clone()
    layer.lora_B["default"].weight.data = ours.lora_B.detach().clone()
    return model, layer


@pytest.mark.parametrize(
    "dropout, use_rslora, quantize, conv1d",
    [(0.0, False, True, False), (0.0, True, True, False), (0.25, False, True, False), (0.1, False, False, False)]
    + [(0.0, False, True, True)],
)
def test_matches_peft(device, dropout, use_rslora, quantize, conv1d):
    torch.manual_seed(0)
    source = Conv1D(96, 128) if conv1d else nn.Linear(128, 96)
    ours = LoraLinear.from_linear(source, r=8, alpha=12, dropout=dropout, use_rslora=use_rslora, quantize=quantize)
    nn.init.normal_(ours.lora_B)  # B starts at zero; make the LoRA branch matter
    theirs, their_layer = peft_twin(ours, conv1d)
    ours.to(device).train()
    theirs.to(device).train()
    tol = FP32_TOL[device.type]
    x = torch.randn(3, 5, 128, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout mask on both sides
    y1 = ours(x1)
    torch.manual_seed(1)
    y2 = theirs(x2)
    assert rel_err(y1, y2) < tol
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert rel_err(x1.grad, x2.grad) < tol
    assert rel_err(ours.lora_A.grad, their_layer.lora_A["default"].weight.grad) < tol
    assert rel_err(ours.lora_B.grad, their_layer.lora_B["default"].weight.grad) < tol
    assert ours.scaling == pytest.approx(12 / (math.sqrt(8) if use_rslora else 8))
    assert not any(p.requires_grad for p in ours.base_layer.parameters())


def test_dropout_mask_is_applied():
    torch.manual_seed(2)
    ours = LoraLinear.from_linear(nn.Linear(64, 64), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(ours.lora_B)
    x = torch.randn(16, 64)
    with torch.no_grad():
        ours.eval()
        eval_out = ours(x)
        ours.train()
        a, b = ours(x), ours(x)
    assert rel_err(a, b) > 1e-3  # fresh masks each call in training
    assert rel_err(a, eval_out) > 1e-3  # and none in eval


def test_saves_no_dense_weight(device):
    """Only x, the mask, the (M, r) activation, A, B and the packed NF4 tensors are kept for backward."""
    torch.manual_seed(3)
    ours = LoraLinear.from_linear(nn.Linear(128, 96), r=4, dropout=0.1).to(device).train()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(6, 128, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours(x).sum().backward()
    floats = [t for t in saved if t.is_floating_point()]
    assert max(t.numel() for t in floats) == x.numel()  # x itself; a dense W would hold 96 * 128
    packed = ours.base_layer.weight
    assert any(t.data_ptr() == packed.data_ptr() for t in saved)  # backward reads the NF4 bytes


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_backward_vs_fp64_reference(device, dropout):
    torch.manual_seed(4)
    ours = LoraLinear.from_linear(nn.Linear(192, 72), r=6, alpha=3, dropout=dropout).to(device).train()
    nn.init.normal_(ours.lora_B)
    x = torch.randn(2, 9, 192, device=device, requires_grad=True)
    torch.manual_seed(5)
    y = ours(x)
    torch.manual_seed(5)  # the layer draws its keep-mask from the F.dropout stream
    mask = torch.nn.functional.dropout(torch.ones_like(x), dropout) != 0 if dropout else None
    leaves = [t.detach().double().requires_grad_() for t in (x, ours.lora_A, ours.lora_B)]
    dense = ours.base_layer.dequantize(torch.float32)
    bias = ours.base_layer.bias.detach()
    ref = reference.lora_linear(leaves[0], dense, bias, leaves[1], leaves[2], ours.scaling, mask, 1 - dropout)
    assert rel_err(y, ref) < FP32_TOL[device.type]
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad.double())
    for ours_grad, ref_leaf in zip((x.grad, ours.lora_A.grad, ours.lora_B.grad), leaves, strict=True):
        assert rel_err(ours_grad, ref_leaf.grad) < FP32_TOL[device.type]


def bf16_layer_errors(device: torch.device, m: int, dropout: float) -> dict[str, float]:
    """A bf16 LoraLinear (NF4 base 192 -> 72, r=6) on ``device`` against the fp64 reference of its fp32 parameters.

    ``m`` rows of bf16 x (<= 16: the decode kernels / C++ GEMV; more: the GEMM / band paths). Returns the rel
    errors of the output and of the gradients of x, A and B (tests/test_cpu_path.py runs this too, on the C++ path).
    """
    torch.manual_seed(10)
    ours = LoraLinear.from_linear(nn.Linear(192, 72), r=6, alpha=12, dropout=dropout).to(device).train()
    nn.init.normal_(ours.lora_B)
    x = torch.randn(m, 192, device=device).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(11)  # the layer draws its keep-mask from the F.dropout stream, in the compute dtype
    mask = torch.nn.functional.dropout(torch.ones_like(x), dropout) != 0 if dropout else None
    leaves = [t.detach().double().requires_grad_() for t in (x, ours.lora_A, ours.lora_B)]
    dense = ours.base_layer.dequantize(torch.float32)
    bias = ours.base_layer.bias.detach()
    ref = reference.lora_linear(leaves[0], dense, bias, leaves[1], leaves[2], ours.scaling, mask, 1 - dropout)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad.double())
    assert y.dtype == x.grad.dtype == torch.bfloat16
    grads = {"grad_x": x.grad, "grad_A": ours.lora_A.grad, "grad_B": ours.lora_B.grad}
    errors = {"out": rel_err(y, ref)}
    errors.update({name: rel_err(g, leaf.grad) for (name, g), leaf in zip(grads.items(), leaves, strict=True)})
    return errors


@pytest.mark.parametrize(("m", "dropout"), [(5, 0.0), (34, 0.0), (34, 0.25)])
def test_bf16_forward_backward_vs_fp64_reference(device, m, dropout):
    for name, err in bf16_layer_errors(device, m, dropout).items():
        assert err < BF16_TOL, f"{name}: rel err {err:.2e}"


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(5)
    ours = LoraLinear.from_linear(nn.Linear(128, 64), r=4, alpha=8).to(device).train()
    nn.init.normal_(ours.lora_B)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 7, 128, device=device, requires_grad=True)
    grads = []
    for fn in (compiled, ours):
        x.grad = ours.lora_A.grad = ours.lora_B.grad = None
        y = fn(x)
        y.pow(2).sum().backward()
        grads.append((y.detach(), x.grad, ours.lora_A.grad, ours.lora_B.grad))
    for c, e in zip(*grads, strict=True):
        assert rel_err(c, e) < FP32_TOL[device.type]


def test_autocast_bf16(device):
    torch.manual_seed(6)
    ours = LoraLinear.from_linear(nn.Linear(128, 64), r=4).to(device)
    nn.init.normal_(ours.lora_B)
    x = torch.randn(8, 128, device=device, requires_grad=True)
    ref = ours(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 2e-2
    y.float().sum().backward()
    assert ours.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_same_grads(device, use_reentrant):
    torch.manual_seed(7)
    layers = nn.ModuleList(LoraLinear.from_linear(nn.Linear(64, 64), r=4, dropout=0.2) for _ in range(2))
    layers.to(device).train()
    for layer in layers:
        nn.init.normal_(layer.lora_B)

    def block(h: torch.Tensor) -> torch.Tensor:
        return layers[1](torch.tanh(layers[0](h)))

    x = torch.randn(5, 64, device=device, requires_grad=True)
    results = []
    for ckpt in (False, True):
        layers.zero_grad()
        torch.manual_seed(8)
        out = checkpoint(block, x, use_reentrant=use_reentrant) if ckpt else block(x)
        out.sum().backward()
        results.append([p.grad.clone() for p in layers.parameters() if p.requires_grad])
    for with_ckpt, without in zip(results[1], results[0], strict=True):
        if device.type == "cpu":
            assert torch.equal(with_ckpt, without)
        else:  # split-K decode kernels add partial sums atomically, in no fixed order
            assert rel_err(with_ckpt, without) < 1e-6


def test_init():
    torch.manual_seed(9)
    base = nn.Linear(256, 64)
    ours = LoraLinear.from_linear(base, r=16)
    bound = 1 / math.sqrt(256)  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert ours.lora_A.abs().max() <= bound and ours.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(ours.lora_B) == 0
    x = torch.randn(4, 256)
    assert torch.equal(ours(x), ours.base_layer(x))
    gaussian = LoraLinear.from_linear(base, r=16, init="gaussian")
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 16, rel=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r .LoRA rank. must be a positive integer"),
        ({"r": 2.5}, "r .LoRA rank. must be a positive integer"),
        ({"alpha": 0}, "alpha .LoRA alpha. must be a number > 0"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"init": "zeros"}, "init must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraLinear.from_linear(nn.Linear(64, 64), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alpha": float("inf")}, ValueError, r"alpha .LoRA alpha. must be a number > 0 \(finite\), got inf"),
        ({"alpha": float("nan")}, ValueError, "alpha .LoRA alpha. must be a number > 0 .finite., got nan"),
        ({"alpha": True}, ValueError, "alpha .LoRA alpha. must be a number > 0"),
        ({"dropout": float("nan")}, ValueError, r"dropout must be a number in \[0, 1\)"),
        ({"use_rslora": "false"}, TypeError, "use_rslora must be a bool, got 'false'"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be a bool"),
    ],
)
def test_non_finite_and_mistyped_hyper_parameters(kwargs, error, message):
    # Each used to build a layer whose every output is NaN (alpha=inf) or that silently turned rsLoRA on.
    with pytest.raises(error, match=message):
        LoraLinear.from_linear(nn.Linear(64, 64), **kwargs)
    with pytest.raises(error, match=message):
        LoraLinear(nn.Linear(64, 64), **{"r": 4, **kwargs})
