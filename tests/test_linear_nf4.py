"""LinearNF4: bitsandbytes-identical state dict (both directions), forward/backward vs the fp64 reference on every
device (the ``device`` fixture), in fp32 and bf16."""

import json

import pytest
import torch
from _metrics import rel_err
from _tiny_models import bnb_linear4bit
from torch import nn

from fastllm import LinearNF4, reference
from fastllm.nf4 import BNB_QUANT_STATE_KEY, quantize
from fastllm.nn.bnb_convert import convert_bnb_linear4bit, linear_nf4_from_bnb

# fp32 against fp64: the CPU paths sum in one order, CUDA in tiles (both far tighter than any bug).
FP32_TOL = {"cpu": 1e-5, "cuda": 2e-5}
BF16_TOL = 2e-2


@pytest.fixture
def bnb():
    """bitsandbytes (its CPU backend is the oracle here); the GPU machines may not have it installed."""
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(
    "in_f, out_f, bias, double_quant, dtype",
    [(64, 48, True, True, torch.float32), (72, 40, False, True, torch.float32), (128, 33, True, False, torch.bfloat16)],
)
def test_state_dict_equals_bitsandbytes(bnb, in_f, out_f, bias, double_quant, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    theirs = bnb_linear4bit(linear, double_quant).state_dict()
    ours = LinearNF4.from_linear(linear, double_quant=double_quant).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def test_loads_bitsandbytes_state_dict_and_bnb_loads_ours(bnb):
    torch.manual_seed(1)
    linear = nn.Linear(128, 80)
    theirs = bnb_linear4bit(linear)
    # A layer in another format (blocksize, double quantization) refuses the state dict: loading would silently
    # change its format. assign=True adopts the state dict's format, as it adopts a parameter's dtype.
    ours = LinearNF4.from_linear(nn.Linear(128, 80), blocksize=128, double_quant=False)
    with pytest.raises(ValueError, match=r"format \(blocksize, double_quant, dtype\) = \(64, True, torch.float32\)"):
        ours.load_state_dict(theirs.state_dict())
    result = ours.load_state_dict(theirs.state_dict(), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert (ours.blocksize, ours.nested_absmax is not None) == (64, True)
    same_format = LinearNF4.from_linear(nn.Linear(128, 80))
    same_format.load_state_dict(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in same_format.state_dict().items())
    x = torch.randn(5, 128)
    assert rel_err(ours(x), theirs(x)) < 1e-5
    # bitsandbytes loads a quantized state dict through Params4bit.from_prequantized (as transformers does).
    sd = LinearNF4.from_linear(linear).state_dict()
    reloaded = bnb.nn.Linear4bit(128, 80, quant_type="nf4", quant_storage=torch.uint8)
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    reloaded.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=reloaded)
    reloaded.bias.data = sd["bias"]
    assert torch.equal(reloaded(x), theirs(x))


@pytest.mark.parametrize("in_f, out_f, batch", [(128, 40, (3,)), (192, 65, (2, 7)), (72, 24, (5,))])
def test_forward_backward_vs_reference(device, in_f, out_f, batch):
    # (72, 24): K is not a multiple of the blocksize, the dequantize fallback runs.
    torch.manual_seed(2)
    linear = nn.Linear(in_f, out_f)
    layer = LinearNF4.from_linear(linear).to(device)
    w = quantize(linear.weight)
    dense = reference.dequantize_nf4(w.data, w.absmax, w.nested_absmax, w.offset, 64, w.shape, torch.float64)
    x = torch.randn(*batch, in_f, device=device, requires_grad=True)
    y = layer(x)
    ref = reference.linear(x.detach().cpu(), dense, linear.bias.detach())
    assert y.dtype == torch.float32 and rel_err(y.cpu(), ref) < FP32_TOL[device.type]
    grad = torch.randn_like(y)
    y.backward(grad)
    assert rel_err(x.grad.cpu(), grad.double().cpu() @ dense) < FP32_TOL[device.type]
    assert not any(p.requires_grad for p in layer.parameters())


def test_compute_dtype_and_autocast(device):
    torch.manual_seed(3)
    linear = nn.Linear(128, 64)
    layer = LinearNF4.from_linear(linear, compute_dtype=torch.float16).to(device)
    x = torch.randn(4, 128, device=device)
    ref = reference.linear(x, layer.dequantize(torch.float32), layer.bias.detach())
    y = layer(x)
    assert y.dtype == torch.float32  # computed in fp16, returned in the input's dtype (as bitsandbytes)
    assert 1e-6 < rel_err(y, ref) < 3e-3
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 2e-2


def bf16_linear_errors(device: torch.device, m: int) -> dict[str, float]:
    """A LinearNF4 (192 -> 75, with bias) on ``device`` fed ``m`` rows of bf16 x, against the fp64 reference of its
    fp32 dequantized weight: rel errors of the output and of grad_x (tests/test_cpu_path.py runs this too)."""
    torch.manual_seed(8)
    linear = nn.Linear(192, 75)
    layer = LinearNF4.from_linear(linear).to(device)
    x = torch.randn(m, 192, device=device).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    dense = layer.dequantize(torch.float32)
    grad = torch.randn_like(y)
    y.backward(grad)
    return {
        "out": rel_err(y, reference.linear(x.detach(), dense, layer.bias.detach())),
        "grad_x": rel_err(x.grad, grad.double() @ dense.double()),
    }


@pytest.mark.parametrize("m", [3, 37])  # the decode kernels / C++ GEMV, and the GEMM / band path
def test_bf16_forward_backward_vs_reference(device, m):
    for name, err in bf16_linear_errors(device, m).items():
        assert err < BF16_TOL, f"{name}: rel err {err:.2e}"


def test_torch_compile_fullgraph(device):
    torch.manual_seed(5)
    layer = LinearNF4.from_linear(nn.Linear(128, 64)).to(device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    dense = layer.dequantize(torch.float32)
    assert rel_err(y, reference.linear(x.detach(), dense, layer.bias.detach())) < FP32_TOL[device.type]
    ones = torch.ones(3, 64, dtype=torch.float64, device=device)
    assert rel_err(x.grad, ones @ dense.double()) < FP32_TOL[device.type]


def test_module_to_dtype_keeps_statistics():
    torch.manual_seed(4)
    layer = LinearNF4.from_linear(nn.Linear(128, 64), double_quant=True)
    plain = LinearNF4.from_linear(nn.Linear(128, 64), double_quant=False)
    before = [layer.state_dict(), plain.state_dict()]
    for module, sd in zip([layer, plain], before, strict=True):
        module.to(torch.bfloat16)
        assert module.bias.dtype == torch.bfloat16
        after = module.state_dict()
        for key in sd:
            if key != "bias":
                assert torch.equal(after[key], sd[key]), key


def test_weight_is_row_shardable_parameter():
    layer = LinearNF4.from_linear(nn.Linear(128, 96))
    params = dict(layer.named_parameters())
    assert params["weight"].shape == (96, 64) and params["weight"].dtype == torch.uint8
    assert params["absmax"].shape == (96 * 128 // 64,)
    assert not any(p.requires_grad for p in params.values())
    # The packed rows are the bitsandbytes bytes in order: row i holds weight row i.
    assert torch.equal(layer.weight.reshape(-1), quantize(layer.dequantize(torch.float32)).data)


def test_bad_input():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        LinearNF4.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="blocksize"):
        LinearNF4.from_linear(nn.Linear(64, 64), blocksize=48)
    layer = LinearNF4.from_linear(nn.Linear(64, 32))
    other = LinearNF4.from_linear(nn.Linear(64, 48)).state_dict()
    with pytest.raises(ValueError, match=r"holds a weight of shape \(48, 64\), this layer needs \(32, 64\)"):
        layer.load_state_dict(other)
    missing = {k: v for k, v in layer.state_dict().items() if k != "weight.absmax"}
    with pytest.raises(RuntimeError, match="Missing key.*weight.absmax"):
        layer.load_state_dict(missing)


@pytest.mark.parametrize("double_quant, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_converted_bitsandbytes_layers_share_bytes_and_outputs(bnb, double_quant, dtype):
    torch.manual_seed(6)
    first = bnb_linear4bit(nn.Linear(128, 72, dtype=dtype), double_quant)
    model = nn.Sequential(first, nn.ReLU(), bnb_linear4bit(nn.Linear(72, 40, bias=False)))
    x = torch.randn(3, 128)
    expected = model(x)
    theirs = [model[0], model[2]]
    pointers = [(m.weight.data_ptr(), m.weight.quant_state.absmax.data_ptr()) for m in theirs]
    assert convert_bnb_linear4bit(model) is model
    for ours, bnb_module, (weight_ptr, absmax_ptr) in zip([model[0], model[2]], theirs, pointers, strict=True):
        assert isinstance(ours, LinearNF4) and ours.compute_dtype == bnb_module.compute_dtype
        assert ours.weight.data_ptr() == weight_ptr and ours.absmax.data_ptr() == absmax_ptr
        assert ours.state_dict().keys() == bnb_module.state_dict().keys()
        assert all(torch.equal(v, bnb_module.state_dict()[k]) for k, v in ours.state_dict().items())
    assert rel_err(model(x), expected) < 1e-5


def test_bitsandbytes_conversion_refuses_what_it_cannot_share(bnb):
    with pytest.raises(TypeError, match="module must be a bitsandbytes Linear4bit, got Linear"):
        linear_nf4_from_bnb(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="not quantized yet"):
        linear_nf4_from_bnb(bnb.nn.Linear4bit(64, 32, quant_type="nf4"))
    with pytest.raises(ValueError, match="only quant_type='nf4'.*'fp4'"):
        linear_nf4_from_bnb(bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu"))
    with pytest.raises(ValueError, match="only quant_storage=torch.uint8.*torch.bfloat16"):
        linear_nf4_from_bnb(bnb.nn.Linear4bit(64, 32, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu"))


# -- strict loading: every bad state dict is refused naming the key, and the layer is left as it was -------------

RECORD = f"weight.{BNB_QUANT_STATE_KEY}"


def _record_bytes(value) -> torch.Tensor:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def _with_record(sd: dict, **changes) -> dict:
    record = json.loads(bytes(sd[RECORD].numpy()).decode())
    for field, value in changes.items():
        if value is _DROP:
            record.pop(field)
        else:
            record[field] = value
    return {**sd, RECORD: _record_bytes(record)}


class _Drop:
    """Marks a field to remove from the record (a stable repr keeps test ids equal across xdist workers)."""

    def __repr__(self) -> str:
        return "DROP"


_DROP = _Drop()

# (change to the JSON record, the field or phrase the error must name)
_BAD_RECORDS = [
    (dict(blocksize=None), "field 'blocksize' must be one of .*got None \\(JSON null\\)"),
    (dict(blocksize="64"), "field 'blocksize' must be one of .*'64' \\(JSON string\\)"),
    (dict(blocksize=64.0), "field 'blocksize' must be one of"),
    (dict(blocksize=True), "field 'blocksize' must be one of"),
    (dict(blocksize=48), "field 'blocksize' must be one of"),
    (dict(blocksize=128), "format \\(blocksize, double_quant, dtype\\) = \\(128, True"),
    (dict(quant_type="fp4"), "field 'quant_type' must be 'nf4'"),
    (dict(quant_type=None), "field 'quant_type' must be 'nf4'"),
    (dict(dtype="float64"), "field 'dtype' must be one of"),
    (dict(dtype=None), "field 'dtype' must be one of"),
    (dict(dtype="bfloat16"), "format .*torch.bfloat16\\) differs from this layer's"),
    (dict(shape=[64]), "holds a weight of shape \\(64,\\), this layer needs \\(32, 64\\)"),
    (dict(shape=[48, 64]), "holds a weight of shape \\(48, 64\\), this layer needs \\(32, 64\\)"),
    (dict(shape="32x64"), "field 'shape' must be a non-empty list of positive integers"),
    (dict(shape=[32, -64]), "field 'shape' must be a non-empty list"),
    (dict(shape=[32, 64.0]), "field 'shape' must be a non-empty list"),
    (dict(shape=[]), "field 'shape' must be a non-empty list"),
    (dict(nested_blocksize=128), "field 'nested_blocksize' must be 256"),
    (dict(nested_blocksize="256"), "field 'nested_blocksize' must be 256"),
    (dict(nested_dtype="float16"), "field 'nested_dtype' must be 'float32'"),
    (dict(nested_offset=float("nan")), "field 'nested_offset' must be a finite number"),
    (dict(nested_offset=float("inf")), "field 'nested_offset' must be a finite number"),
    (dict(nested_offset=None), "field 'nested_offset' must be a finite number"),
    (dict(nested_offset="0.01"), "field 'nested_offset' must be a finite number"),
    (dict(nested_offset=True), "field 'nested_offset' must be a finite number"),
    (dict(nested_offset=-0.5), "field 'nested_offset' must be >= 0"),
    (dict(nested_dtype=_DROP), "has \\['nested_blocksize', 'nested_offset'\\] but not all"),
    (dict(blocksize=_DROP), "record lacks \\['blocksize'\\]"),
    (dict(compress="yes"), "unknown field\\(s\\) \\['compress'\\]"),
]


def _layer_and_state(double_quant: bool = True, bias: bool = True) -> tuple[LinearNF4, dict, dict]:
    """A layer, a valid state dict of another weight in its format, and the layer's own state (to compare)."""
    torch.manual_seed(7)
    layer = LinearNF4.from_linear(nn.Linear(64, 32, bias=bias), double_quant=double_quant)
    sd = LinearNF4.from_linear(nn.Linear(64, 32, bias=bias), double_quant=double_quant).state_dict()
    return layer, sd, {k: v.clone() for k, v in layer.state_dict().items()}


def _unchanged(layer: LinearNF4, before: dict) -> bool:
    after = layer.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("change, message", _BAD_RECORDS, ids=[str(c) for c, _ in _BAD_RECORDS])
def test_bad_quant_state_records_are_refused(change, message):
    layer, sd, before = _layer_and_state()
    with pytest.raises(ValueError, match=message) as info:
        layer.load_state_dict(_with_record(sd, **change))
    assert "weight" in str(info.value)
    assert _unchanged(layer, before)


@pytest.mark.parametrize(
    "raw, message",
    [
        ([1, 2], "the quant-state record must be a JSON object, got a JSON array"),
        (None, "the quant-state record must be a JSON object, got a JSON null"),
        ("nf4", "the quant-state record must be a JSON object, got a JSON string"),
        (b'{"quant_type": "nf4"', "not a JSON quant-state record"),
        (b"\xff\xfe", "not a JSON quant-state record"),
    ],
)
def test_malformed_quant_state_records_are_refused(raw, message):
    layer, sd, before = _layer_and_state()
    with pytest.raises(ValueError, match=f"{RECORD}: {message}"):
        layer.load_state_dict({**sd, RECORD: _record_bytes(raw)})
    assert _unchanged(layer, before)


def _poke(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


@pytest.mark.parametrize("double_quant", [True, False])
def test_bad_tensors_are_refused(double_quant):
    layer, sd, before = _layer_and_state(double_quant)
    probes = [
        ({"bias": torch.zeros(33)}, "bias: must have shape \\(32,\\), got \\(33,\\)"),
        ({"bias": torch.zeros(32, dtype=torch.int64)}, "bias: must be a floating-point tensor"),
        ({"bias": _poke(sd["bias"], float("nan"))}, "bias: holds 1 non-finite values"),
        ({"weight": sd["weight"].float()}, "weight: must have dtype torch.uint8"),
        ({"weight": sd["weight"][:-1]}, "weight: must hold 1024 elements"),
        ({"weight": [1, 2, 3]}, "weight: expected a torch.Tensor, got list"),
        ({"weight": torch.empty_like(sd["weight"], device="meta")}, "weight: is on the meta device"),
        ({"weight.quant_map": _poke(sd["weight.quant_map"], -0.9)}, "weight.quant_map: is not the NF4 code table"),
        ({"weight.quant_map": sd["weight.quant_map"][:8]}, "weight.quant_map: is not the NF4 code table"),
        ({"weight.absmax": sd["weight.absmax"][:-1]}, "weight.absmax: must hold 32 elements"),
        ({RECORD: sd[RECORD].float()}, "must be uint8 bytes|expected uint8 bytes"),
    ]
    if double_quant:
        probes += [
            ({"weight.absmax": sd["weight.absmax"].float()}, "weight.absmax: must have dtype torch.uint8"),
            ({"weight.nested_absmax": _poke(sd["weight.nested_absmax"], float("nan"))}, "nested_absmax: holds 1 non-f"),
            ({"weight.nested_absmax": _poke(sd["weight.nested_absmax"], float("inf"))}, "nested_absmax: holds 1 non-f"),
            ({"weight.nested_absmax": _poke(sd["weight.nested_absmax"], -1.0)}, "nested_absmax: holds 1 negative"),
            ({"weight.nested_absmax": sd["weight.nested_absmax"].double()}, "nested_absmax: must have dtype"),
            ({"weight.nested_quant_map": _poke(sd["weight.nested_quant_map"], 0.5)}, "nested_quant_map: is not the 8"),
            ({"weight.nested_quant_map": None}, "nested_quant_map: missing, but the quant-state record is double"),
        ]
    else:
        probes += [
            ({"weight.absmax": _poke(sd["weight.absmax"], float("nan"))}, "weight.absmax: holds 1 non-finite"),
            ({"weight.absmax": _poke(sd["weight.absmax"], float("-inf"))}, "weight.absmax: holds 1 non-finite"),
            ({"weight.absmax": _poke(sd["weight.absmax"], -0.5)}, "weight.absmax: holds 1 negative"),
            ({"weight.absmax": sd["weight.absmax"].half()}, "weight.absmax: must have dtype torch.float32"),
            ({"weight.nested_absmax": torch.ones(1)}, "nested_absmax: present, but the quant-state record is not"),
        ]
    for change, message in probes:
        bad = {k: v for k, v in {**sd, **change}.items() if v is not None}
        error = TypeError if isinstance(next(iter(change.values())), list) else ValueError
        with pytest.raises(error, match=message):
            layer.load_state_dict(bad)
        assert _unchanged(layer, before), change.keys()
    layer.load_state_dict(sd)  # the valid one loads
    assert _unchanged(layer, sd)


def test_assign_loads_onto_a_meta_layer():
    torch.manual_seed(8)
    linear = nn.Linear(64, 32)
    sd = LinearNF4.from_linear(linear).state_dict()
    layer = LinearNF4.from_linear(nn.Linear(64, 32)).to("meta")  # as a model built on the meta device
    with pytest.raises(ValueError, match="this layer is on the meta device; load with .*assign=True"):
        layer.load_state_dict(sd)
    layer.load_state_dict(sd, assign=True)
    x = torch.randn(3, 64)
    ref = reference.linear(x, quantize(linear.weight).dequantize(torch.float32), linear.bias.detach())
    assert rel_err(layer(x), ref) < 1e-5
