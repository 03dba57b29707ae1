"""Fuzzing the public entry points with hypothesis: valid and invalid shapes, dtypes, strides and values.

Every drawn call is labelled from the documented contract as VALID, INVALID or EITHER (a value the contract leaves
open, e.g. an out-of-range number the call may clamp or refuse). A VALID call must return a finite result that
matches fastllm.reference (fp64) within the dtype's tolerance; an INVALID one must raise ValueError or TypeError;
nothing may raise anything else, return NaN/Inf from finite input, or change state when it raises.

The kernel entry points run on every device present (the ``device`` fixture: cpu here, cuda too on a GPU).
Bounded and deterministic: ``derandomize=True`` (the same examples on every run, no example database) and small
``max_examples`` so the file runs in well under a minute with the Triton interpreter on CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _metrics import rel_err
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from fastllm import LinearNF4, LoraLinear, load_adapter, prepare_qlora, reference, save_adapter
from fastllm.kernels import attention, attention_varlen, nf4_matmul
from fastllm.nf4 import BNB_QUANT_STATE_KEY, dequantize, quantize

VALID, INVALID, EITHER = "valid", "invalid", "either"
CLEAR_ERRORS = (ValueError, TypeError)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def fuzz(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,  # only `device`, which no example changes
        ],
    )


def outcome(label: str, call):
    """Run ``call``; INVALID must raise ValueError/TypeError, VALID must not. Returns the result or None."""
    try:
        result = call()
    except CLEAR_ERRORS as exc:
        assert label != VALID, f"a valid call raised {type(exc).__name__}: {exc}"
        assert str(exc), "an error without a message"
        return None
    assert label != INVALID, "an invalid call did not raise"
    return result


def worst(*labels: str) -> str:
    return INVALID if INVALID in labels else EITHER if EITHER in labels else VALID


def assert_finite(t: torch.Tensor, what: str) -> None:
    assert torch.isfinite(t).all(), f"{what}: non-finite output from finite input"


# -- tensors ---------------------------------------------------------------------------------------------------


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """A tensor of ``shape`` with seeded normal values, contiguous or not (a transposed or strided view)."""
    seed = draw(st.integers(0, 2**16))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    g = torch.Generator().manual_seed(seed)
    if layout == "strided" and shape:  # every other element of a wider tensor along the last dim
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    else:
        base = torch.randn(*shape, generator=g)
    base = base * scale
    return base.to(dtype) if dtype.is_floating_point else base.round().to(dtype)


class Probe:
    """Draws a call's arguments: most from their valid options, the ``corrupt`` ones (none to two) from the
    invalid ones; ``label`` is then the call's expected outcome."""

    def __init__(self, data, names: list[str]):
        self.data = data
        n = data.draw(st.sampled_from([0, 0, 0, 1, 1, 2]), label="corrupted count")
        self.corrupt = set(data.draw(st.lists(st.sampled_from(names), min_size=n, max_size=n, unique=True)))
        self.labels: list[str] = []

    def arg(self, name: str, valid: list, invalid: list = (), either: list = ()):
        if name in self.corrupt and (invalid or either):
            options = [(v, INVALID) for v in invalid] + [(v, EITHER) for v in either]
        else:
            options = [(v, VALID) for v in valid]
        value, label = self.data.draw(st.sampled_from(options), label=name)
        self.labels.append(label)
        return value

    def draw(self, strategy):
        return self.data.draw(strategy)

    @property
    def label(self) -> str:
        label = worst(*self.labels)
        event(f"expected: {label}")
        return label


FLOATS = [torch.float32, torch.float16, torch.bfloat16]
NOT_FLOATS = [torch.float64, torch.int32, torch.uint8]


# -- quantize / dequantize -------------------------------------------------------------------------------------


@fuzz(30)
@given(data=st.data())
def test_quantize_dequantize(data, device):
    p = Probe(data, ["dtype", "blocksize", "values"])
    shape = p.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 3000))
    dtype = p.arg("dtype", FLOATS, NOT_FLOATS)
    blocksize = p.arg("blocksize", [32, 64, 128, 4096], [48, 0, -64, True, "64", None, 64.0])
    double_quant = p.draw(st.booleans())
    w = p.draw(tensors(tuple(shape), dtype, 10.0 ** p.draw(st.integers(-3, 3)))).to(device)
    poison = p.arg("values", [None], [float("nan"), float("inf"), float("-inf")])
    if poison is not None and dtype.is_floating_point:
        w = w.clone()
        w[torch.unravel_index(torch.tensor(p.draw(st.integers(0, w.numel() - 1))), w.shape)] = poison
    q = outcome(p.label, lambda: quantize(w, blocksize, double_quant))
    if q is None:
        return
    packed, absmax, nested, offset = reference.quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(q.data, packed) and torch.equal(q.absmax, absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, nested) and torch.equal(q.offset, offset)
    out_dtype = p.draw(st.sampled_from([None, torch.float32, torch.bfloat16, torch.int8]))
    dense = outcome(VALID if out_dtype != torch.int8 else INVALID, lambda: dequantize(q, out_dtype))
    if dense is None:
        return
    ref = reference.dequantize_nf4(packed, absmax, nested, offset, blocksize, q.shape, torch.float32)
    assert dense.shape == w.shape and dense.dtype == (out_dtype or dtype)
    assert_finite(dense, "dequantize")
    assert rel_err(dense, ref) <= TOLERANCE[dense.dtype]


# -- nf4_matmul ------------------------------------------------------------------------------------------------


@fuzz(20)
@given(data=st.data())
def test_nf4_matmul(data, device):
    p = Probe(data, ["K", "x features", "x dtype", "bias"])
    blocksize = p.draw(st.sampled_from([32, 64]))
    n = p.draw(st.integers(1, 24))
    k = p.arg("K", [blocksize, 2 * blocksize], [blocksize + 16])
    dense = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)).to(device)
    w = quantize(dense, blocksize, p.draw(st.booleans()))
    batch = p.draw(st.sampled_from([(), (1,), (5,), (2, 3), (0,)]))
    dtype = p.arg("x dtype", FLOATS, NOT_FLOATS)
    x = p.draw(tensors((*batch, p.arg("x features", [k], [k + 1, k - 1])), dtype)).to(device)
    bias_kind = p.arg("bias", ["none", "ok"], ["wrong shape", "wrong dtype", "list"])
    bias = {
        "none": None,
        "ok": torch.randn(n).to(device, dtype),
        "wrong shape": torch.randn(n + 1).to(device, dtype),
        "wrong dtype": torch.randn(n, dtype=torch.float64, device=device),
        "list": [0.0] * n,
    }[bias_kind]
    y = outcome(p.label, lambda: nf4_matmul(x, w, bias))
    if y is None:
        return
    ref = reference.linear(x, w.dequantize(torch.float32), bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    assert_finite(y, "nf4_matmul")
    if y.numel():
        assert rel_err(y, ref) <= TOLERANCE[dtype]


# -- attention -------------------------------------------------------------------------------------------------

GOOD_SOFTCAPS, BAD_SOFTCAPS = [None, None, 0.5, 20.0], [0.0, -1.0, float("inf"), float("nan"), True, "30"]
GOOD_SCALES, BAD_SCALES = [None, None, 0.3, -0.5], [float("inf"), float("-inf"), float("nan"), False, "0.1"]


@fuzz(24)
@given(data=st.data())
def test_attention(data, device):
    p = Probe(data, ["heads", "head dim", "dtype", "Sq", "mask", "window", "softcap", "scale"])
    batch, sk = p.draw(st.integers(1, 2)), p.draw(st.integers(1, 7))
    sq = p.arg("Sq", [1, 3, 6], [0])
    heads, kv_heads = p.arg("heads", [(2, 1), (2, 2), (4, 2)], [(3, 2), (2, 4)])
    dim = p.arg("head dim", [16, 32], [24, 8])
    dtype = p.arg("dtype", [torch.float32, torch.float16], [torch.float64, torch.int32])
    layout = p.draw(st.sampled_from(["bhsd", "bshd"]))  # (B, S, H, D) transposed: HF's usual layout

    def make(h: int, s: int) -> torch.Tensor:
        if layout == "bshd":
            return p.draw(tensors((batch, s, h, dim), dtype)).to(device).transpose(1, 2)
        return p.draw(tensors((batch, h, s, dim), dtype)).to(device)

    q, k, v = make(heads, sq), make(kv_heads, sk), make(kv_heads, sk)
    side = [None, -1, 0, 1, 3]
    window = p.arg("window", [None, (p.draw(st.sampled_from(side)), p.draw(st.sampled_from(side)))], [(-2, 0), (1,)])
    mask_kind = p.arg("mask", ["none", "bool"], ["float", "wrong shape"])
    mask = {
        "none": None,
        "bool": torch.rand(batch, sk, generator=torch.Generator().manual_seed(sk)).to(device) > 0.3,
        "float": torch.ones(batch, sk, device=device),
        "wrong shape": torch.ones(batch, sk + 1, dtype=torch.bool, device=device),
    }[mask_kind]
    softcap = p.arg("softcap", GOOD_SOFTCAPS, BAD_SOFTCAPS)
    scale = p.arg("scale", GOOD_SCALES, BAD_SCALES)
    kwargs = dict(causal=p.draw(st.booleans()), scale=scale, key_padding_mask=mask, window=window, softcap=softcap)
    out = outcome(p.label, lambda: attention(q, k, v, **kwargs))
    if out is None:
        return
    ref, _ = reference.attention(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    assert_finite(out, "attention")
    assert rel_err(out, ref) <= TOLERANCE[dtype]


@fuzz(16)
@given(data=st.data())
def test_attention_varlen(data, device):
    p = Probe(data, ["heads", "cu dtype", "max_seqlen", "softcap", "scale"])
    n_seq = p.draw(st.integers(1, 3))
    # Empty sequences are allowed (rows that see no key give 0), but not an empty pack.
    lens_q = p.draw(st.lists(st.integers(0, 5), min_size=n_seq, max_size=n_seq).map(lambda x: [x[0] or 1, *x[1:]]))
    lens_k = p.draw(st.lists(st.integers(0, 5), min_size=n_seq, max_size=n_seq).map(lambda x: [*x[:-1], x[-1] or 2]))
    heads, kv_heads = p.arg("heads", [(2, 1), (2, 2)], [(3, 2)])
    dim = p.draw(st.sampled_from([16, 32]))
    dtype = p.draw(st.sampled_from([torch.float32, torch.float16]))
    q = p.draw(tensors((sum(lens_q), heads, dim), dtype)).to(device)
    k = p.draw(tensors((sum(lens_k), kv_heads, dim), dtype)).to(device)
    v = p.draw(tensors((sum(lens_k), kv_heads, dim), dtype)).to(device)
    cu_dtype = p.arg("cu dtype", [torch.int32], [torch.int64, torch.float32])
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=cu_dtype, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=cu_dtype, device=device)
    slack = p.arg("max_seqlen", [0, 2], [-1])
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack
    kwargs = dict(causal=p.draw(st.booleans()), scale=p.arg("scale", GOOD_SCALES, BAD_SCALES))
    kwargs["softcap"] = p.arg("softcap", GOOD_SOFTCAPS, BAD_SOFTCAPS)
    out = outcome(p.label, lambda: attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs))
    if out is None:
        return
    assert out.shape == q.shape and out.dtype == dtype
    assert_finite(out, "attention_varlen")
    for i in range(n_seq):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        if qs.stop == qs.start:
            continue
        ref, _ = reference.attention(*(t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks))), **kwargs)
        assert rel_err(out[qs], ref[0].transpose(0, 1)) <= TOLERANCE[dtype], i


# -- LoraLinear ------------------------------------------------------------------------------------------------


@fuzz(25)
@given(data=st.data())
def test_lora_linear(data, device):
    p = Probe(data, ["r", "alpha", "dropout", "use_rslora", "x features", "x dtype"])
    in_f, out_f = p.draw(st.sampled_from([64, 128, 40])), p.draw(st.integers(1, 20))
    r = p.arg("r", [1, 4], [0, -2, 2.0, True])
    alpha = p.arg("alpha", [1, 8.5], [0, -1, float("inf"), float("nan"), True, "8"])
    dropout = p.arg("dropout", [0.0, 0.1], [1.0, float("nan"), -0.1])
    use_rslora = p.arg("use_rslora", [False, True], ["false", 0])
    quantized = p.draw(st.booleans())
    x_in = p.arg("x features", [in_f], [in_f + 1])
    dtype = p.arg("x dtype", FLOATS, [torch.int32], [torch.float64])  # float64: dense base yes, NF4 kernels no
    torch.manual_seed(p.draw(st.integers(0, 1000)))
    linear = nn.Linear(in_f, out_f).to(device)
    layer_label = worst(*p.labels[:4])
    layer = outcome(layer_label, lambda: LoraLinear.from_linear(linear, r, alpha, dropout, use_rslora, quantized))
    if layer is None:
        return
    nn.init.normal_(layer.lora_B, std=0.1)
    layer.eval()  # dropout off: the reference has no mask
    x = p.draw(tensors((p.draw(st.integers(1, 4)), x_in), dtype)).to(device)
    if dtype.is_floating_point:
        x.requires_grad_(True)
    y = outcome(p.label, lambda: layer(x))
    if y is None:
        return
    base = layer.base_layer
    dense = base.dequantize(torch.float32) if quantized else base.weight.detach()
    ref = reference.lora_linear(x.detach(), dense, base.bias.detach(), layer.lora_A, layer.lora_B, layer.scaling)
    assert y.dtype == dtype and y.shape == (x.shape[0], out_f)
    assert_finite(y, "LoraLinear")
    assert rel_err(y, ref) <= max(TOLERANCE[dtype], 1e-5)
    y.float().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    a, b = layer.lora_A.detach().double().requires_grad_(True), layer.lora_B.detach().double().requires_grad_(True)
    reference.lora_linear(xd, dense, base.bias.detach(), a, b, layer.scaling).sum().backward()
    assert_finite(layer.lora_A.grad, "grad A")
    assert rel_err(layer.lora_B.grad, b.grad) <= 2 * max(TOLERANCE[dtype], 1e-5)
    assert rel_err(x.grad, xd.grad) <= 2 * max(TOLERANCE[dtype], 1e-5)


# -- LinearNF4.load_state_dict -----------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 5000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
RECORD_FIELDS = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]
RECORD = f"weight.{BNB_QUANT_STATE_KEY}"


def _state(layer: nn.Module) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@fuzz(60)
@given(data=st.data())
def test_linear_nf4_load_state_dict(data):
    double_quant, bias = data.draw(st.booleans()), data.draw(st.booleans())
    layer = LinearNF4.from_linear(nn.Linear(64, 24, bias=bias), double_quant=double_quant)
    sd = _state(LinearNF4.from_linear(nn.Linear(64, 24, bias=bias), double_quant=double_quant))
    before = _state(layer)
    mutation = data.draw(st.sampled_from(["record field", "record bytes", "tensor value", "tensor dtype", "size"]))
    key = data.draw(st.sampled_from(sorted(sd)))
    if mutation == "record field":
        record = json.loads(bytes(sd[RECORD].numpy()).decode())
        field = data.draw(st.sampled_from([*RECORD_FIELDS, "extra"]))
        record[field] = data.draw(JSON_VALUES)
        sd[RECORD] = torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)
    elif mutation == "record bytes":
        raw = data.draw(st.binary(max_size=40) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
        sd[RECORD] = torch.tensor(list(raw), dtype=torch.uint8)
    elif mutation == "tensor value" and sd[key].is_floating_point():
        value = data.draw(st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 1e30, 3.0]))
        sd[key] = sd[key].clone()
        sd[key].view(-1)[data.draw(st.integers(0, sd[key].numel() - 1))] = value
    elif mutation == "tensor dtype":
        sd[key] = sd[key].to(data.draw(st.sampled_from([torch.float16, torch.float64, torch.uint8, torch.int32])))
    elif mutation == "size":
        sd[key] = sd[key].reshape(-1)[: max(0, sd[key].numel() - data.draw(st.integers(1, 3)))]
    try:
        layer.load_state_dict(sd)
    except CLEAR_ERRORS as exc:
        assert str(exc) and _same(_state(layer), before), "a refused state dict changed the layer"
        return
    except RuntimeError as exc:  # torch's own strict-mode report of missing/unexpected keys (no key is ours)
        assert "Missing key" in str(exc) or "Unexpected key" in str(exc), exc
        assert _same(_state(layer), before)
        return
    # Accepted: the layer now holds exactly what was loaded, and computes finite outputs.
    loaded = _state(layer)
    for k, v in loaded.items():
        assert torch.equal(v, sd[k].to(v.dtype)), k
    assert_finite(layer(torch.randn(3, 64)), "LinearNF4 after load")


# -- load_adapter ----------------------------------------------------------------------------------------------

CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "lora_dropout", "fan_in_fan_out", "use_dora"]


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 32), nn.Linear(32, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = prepare_qlora(_TwoLayers(), r=4, alpha=8, progress=False)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            nn.init.normal_(m.lora_B, std=0.1)
    directory = tmp_path_factory.mktemp("fuzz_adapter")
    save_adapter(model, directory)
    return directory


@fuzz(40)
@given(data=st.data())
def test_load_adapter(data, adapter_dir, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    mutation = data.draw(st.sampled_from(["config value", "config file", "tensor", "none"]))
    raw_config = None
    if mutation == "config value":
        config[data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(JSON_VALUES)
    elif mutation == "config file":
        raw_config = data.draw(st.binary(max_size=30) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
    elif mutation == "tensor":
        key = data.draw(st.sampled_from(sorted(weights)))
        kind = data.draw(st.sampled_from(["nan", "dtype", "shape", "drop", "extra"]))
        if kind == "nan":
            weights[key] = weights[key].clone().fill_(float("nan"))
        elif kind == "dtype":
            weights[key] = weights[key].to(data.draw(st.sampled_from([torch.float16, torch.int32, torch.float64])))
        elif kind == "shape":
            weights[key] = weights[key][:, :-1].contiguous()
        elif kind == "drop":
            del weights[key]
        else:
            weights["base_model.model.extra.lora_A.weight"] = torch.zeros(4, 8)
    directory = tmp_path_factory.mktemp("case")
    save_file(weights, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_bytes(
        raw_config if raw_config is not None else json.dumps(config).encode()
    )
    model = prepare_qlora(_TwoLayers(), r=4, alpha=2, progress=False)
    before = _state(model)
    try:
        load_adapter(model, directory)
    except CLEAR_ERRORS as exc:
        assert str(directory) in str(exc), f"the error does not name the file: {exc}"
        assert _same(_state(model), before), "a refused adapter changed the model"
        return
    # Accepted: every layer holds sane hyper-parameters and the file's weights, and computes finite outputs.
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            assert type(m.alpha) in (int, float) and math.isfinite(m.alpha) and m.alpha > 0, m.alpha
            assert isinstance(m.use_rslora, bool) and math.isfinite(m.scaling)
            assert torch.equal(m.lora_A, weights[f"base_model.model.{name}.lora_A.weight"].to(m.lora_A.dtype))
    assert_finite(model(torch.randn(2, 64)), "model after load_adapter")
