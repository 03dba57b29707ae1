"""PEFT-format adapters (both directions), merge_and_unload / save_merged, and bad adapter files."""

import copy
import json
import os
import signal
import threading

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


# -- crash safety: a save interrupted at any file operation leaves the old pair or the new pair -----------------


def _lora_state(model: nn.Module) -> dict:
    """alpha, use_rslora and every A/B of ``model``'s LoRA layers."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out[name] = (m.alpha, m.use_rslora, m.lora_A.detach().clone(), m.lora_B.detach().clone())
    return out


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) and torch.equal(a[k][3], b[k][3]) for k in a
    )


def _visible(directory) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def two_versions(tmp_path):
    """(target dir holding the old adapter + a foreign file, old model, new model, reader model)."""
    old = prepared("llama", seed=0)
    new = prepared("llama", seed=1)
    for m in new.modules():
        if isinstance(m, LoraLinear):
            m.alpha = 16  # the config differs too: a mixed pair would load with the wrong scale
    target = tmp_path / "adapter"
    save_adapter(old, target)
    (target / "README.md").write_text("kept")
    reader = prepare_qlora(make_model("llama"), r=4, alpha=1, progress=False)
    return target, old, new, reader


def _check_pair(target, versions: dict, reader, allowed: tuple[str, ...], where: str) -> str:
    """The directory holds exactly one of the ``allowed`` versions and loads as that version; returns which."""
    seen = _visible(target)
    which = [name for name in allowed if seen == versions[name][0]]
    assert which, f"{where}: the directory holds a mixed or torn adapter: {sorted(seen)}"
    load_adapter(reader, target)
    assert _same_state(_lora_state(reader), versions[which[0]][1]), where
    return which[0]


def _versions(tmp_path, target, old, new) -> dict:
    """name -> (the files a clean save writes, the LoRA state they load as)."""
    save_adapter(new, tmp_path / "new_copy")
    (tmp_path / "new_copy" / "README.md").write_text("kept")
    return {"old": (_visible(target), _lora_state(old)), "new": (_visible(tmp_path / "new_copy"), _lora_state(new))}


def test_save_adapter_every_fault(tmp_path, two_versions, monkeypatch):
    from _faults import PLAN, every_fault, fsync_counted

    from fastllm.nn import adapters

    target, old, new, reader = two_versions
    versions = _versions(tmp_path, target, old, new)
    monkeypatch.setattr(adapters, "save_file", PLAN.wrap(adapters.save_file, "safetensors.save_file"))

    def check(n, error):
        allowed = ("old", "new") if error else ("new",)
        _check_pair(target, versions, reader, allowed, f"fault at step {n} ({error})")

    with fsync_counted(monkeypatch):
        steps = every_fault(lambda: save_adapter(new, target), check, reset=lambda: save_adapter(old, target))
    assert steps >= 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork + SIGKILL of the writer")
def test_save_adapter_killed_at_every_step(tmp_path, two_versions, monkeypatch):
    from _faults import PLAN, every_fault, every_kill, fsync_counted

    from fastllm.nn import adapters

    target, old, new, reader = two_versions
    versions = _versions(tmp_path, target, old, new)
    monkeypatch.setattr(adapters, "save_file", PLAN.wrap(adapters.save_file, "safetensors.save_file"))
    outcomes = []

    def check(n, status):
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), (n, status)
        outcomes.append(_check_pair(target, versions, reader, ("old", "new"), f"killed at step {n}"))
        save_adapter(old, target)

    with fsync_counted(monkeypatch):
        steps = every_fault(lambda: save_adapter(new, target), lambda n, e: None, lambda: save_adapter(old, target))
        save_adapter(old, target)
        every_kill(lambda: save_adapter(new, target), check, steps)
    # Killed before the swap: the old pair; after it: the new one (and nothing else ever).
    assert outcomes[0] == "old" and outcomes[-1] == "new" and outcomes == sorted(outcomes, key=["old", "new"].index)


def test_load_adapter_while_another_thread_saves(tmp_path, two_versions):
    target, old, new, reader = two_versions
    states = [_lora_state(old), _lora_state(new)]
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            save_adapter((old, new)[i % 2], target)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for i in range(40):
            load_adapter(reader, target)
            got = _lora_state(reader)
            assert any(_same_state(got, s) for s in states), f"load {i} mixed two saves"
    finally:
        stop.set()
        thread.join()


def test_save_merged_every_fault(tmp_path, monkeypatch):
    from _faults import every_fault, fsync_counted

    old, new = prepared("gpt2", seed=0), prepared("gpt2", seed=1)
    target = tmp_path / "merged"
    save_merged(copy.deepcopy(old), target)
    (target / "tokenizer.json").write_text("{}")  # not the model's: kept by every save
    (target / "model-00001-of-00002.safetensors").write_text("stale shard of an earlier save: replaced")
    save_merged(copy.deepcopy(old), target)
    versions = {"old": _visible(target)}
    save_merged(copy.deepcopy(new), tmp_path / "clean")
    versions["new"] = {**_visible(tmp_path / "clean"), "tokenizer.json": b"{}"}
    assert sorted(versions["old"]) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert versions["old"]["model.safetensors"] != versions["new"]["model.safetensors"]

    def check(n, error):
        seen = _visible(target)
        assert seen in ([versions["old"], versions["new"]] if error else [versions["new"]]), f"step {n}: {error}"

    with fsync_counted(monkeypatch):
        steps = every_fault(
            lambda: save_merged(copy.deepcopy(new), target),
            check,
            reset=lambda: save_merged(copy.deepcopy(old), target),
        )
    assert steps >= 10
    batch = make_batch("gpt2")
    reloaded = T.AutoModelForCausalLM.from_pretrained(target).eval()
    assert rel_err(logits(reloaded, batch), logits(new, batch)) < 1e-5


def test_merged_weights_are_frozen_like_peft():
    model = prepared("llama")
    merged = merge_and_unload(copy.deepcopy(model))
    targets = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    theirs = dict(peft_model.merge_and_unload().named_parameters())
    ours = dict(merged.named_parameters())
    assert ours.keys() == theirs.keys()
    assert {n: p.requires_grad for n, p in ours.items()} == {n: p.requires_grad for n, p in theirs.items()}
    assert not any(p.requires_grad for p in ours.values())


# -- strict loading: every bad config or weights file is refused, naming the file and the key -------------------

_BAD_CONFIGS = [
    ({"use_rslora": "false"}, r"use_rslora must be true or false, got 'false' \(JSON string\)"),
    ({"use_rslora": 1}, "use_rslora must be true or false"),
    ({"lora_alpha": True}, r"lora_alpha must be a finite number > 0, got True \(JSON bool\)"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number > 0, got inf"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0, got nan"),
    ({"lora_alpha": -8}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": "8"}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number > 0"),
    ({"r": 4.0}, "r must be a positive integer, got 4.0"),
    ({"r": True}, "r must be a positive integer"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 8}, r"r=8, but .* holds .*lora_A.weight' of rank 4"),
    ({"target_modules": ["q_proj", "v_proj"]}, "does not select 'model.layers.0.mlp.down_proj'"),
    ({"target_modules": "model\\.layers\\.0\\..*"}, "does not select 'model.layers.1."),
    ({"target_modules": 5}, "target_modules must be null, a string or a list of strings"),
    ({"target_modules": ["q_proj", 3]}, "target_modules must be null, a string or a list of strings"),
    ({"target_modules": "("}, "target_modules must be a valid regular expression"),
    ({"use_dora": True}, "use_dora must be false"),
    ({"use_dora": "no"}, "use_dora must be true or false"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be true or false"),
    ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module rank_pattern is not supported"),
]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    model = prepared("llama")
    save_adapter(model, directory)
    return model, directory


def _rewrite(source, directory, config: bytes | None = None, weights: bytes | None = None):
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes(
        weights if weights is not None else (source / "adapter_model.safetensors").read_bytes()
    )
    (directory / "adapter_config.json").write_bytes(
        config if config is not None else (source / "adapter_config.json").read_bytes()
    )
    return directory


@pytest.mark.parametrize("change, message", _BAD_CONFIGS, ids=[str(c) for c, _ in _BAD_CONFIGS])
def test_bad_config_values_are_refused(tmp_path, saved_llama, change, message):
    model, source = saved_llama
    config = {**json.loads((source / "adapter_config.json").read_text()), **change}
    bad = _rewrite(source, tmp_path / "bad", config=json.dumps(config).encode())
    before = _lora_state(model)
    with pytest.raises(ValueError, match=message) as info:
        load_adapter(model, bad)
    assert str(bad / "adapter_config.json") in str(info.value)
    assert _same_state(_lora_state(model), before)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[1, 2]", "must hold a JSON object \\(a PEFT LoraConfig\\), got a JSON array"),
        (b'"LORA"', "got a JSON string"),
        (b"null", "got a JSON null"),
        (b'{"r": 4,', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_malformed_config_files_are_refused(tmp_path, saved_llama, raw, message):
    model, source = saved_llama
    bad = _rewrite(source, tmp_path / "bad", config=raw)
    with pytest.raises(ValueError, match=message) as info:
        load_adapter(model, bad)
    assert str(bad / "adapter_config.json") in str(info.value)


def test_bad_weight_files_are_refused(tmp_path, saved_llama):
    model, source = saved_llama
    before = _lora_state(model)
    raw = (source / "adapter_model.safetensors").read_bytes()
    for name, content in [("truncated", raw[: len(raw) // 2]), ("empty", b""), ("garbage", b"\x00" * 64)]:
        bad = _rewrite(source, tmp_path / name, weights=content)
        with pytest.raises(ValueError, match="not a readable safetensors file") as info:
            load_adapter(model, bad)
        assert str(bad / "adapter_model.safetensors") in str(info.value)
    tensors = load_file(source / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    for value in (float("nan"), float("inf")):
        poisoned = {**tensors, key: tensors[key].clone().index_fill_(1, torch.tensor([1]), value)}
        (tmp_path / f"p{value}").mkdir()
        save_file(poisoned, tmp_path / f"p{value}" / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=f"{key}' holds 64 non-finite values"):
            load_adapter(model, tmp_path / f"p{value}")
    huge = {**tensors, key: torch.full_like(tensors[key], 1e6, dtype=torch.float64)}
    model16 = copy.deepcopy(model).to(torch.float16)
    (tmp_path / "overflow").mkdir()
    save_file(huge, tmp_path / "overflow" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="non-finite values .* in torch.float16"):  # finite in the file, inf in fp16
        load_adapter(model16, tmp_path / "overflow")
    assert _same_state(_lora_state(model), before)


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r"model\.layers\.\d\..*", None],
)
def test_peft_style_target_modules_load(tmp_path, saved_llama, targets):
    model, source = saved_llama
    config = {**json.loads((source / "adapter_config.json").read_text()), "target_modules": targets}
    good = _rewrite(source, tmp_path / "good", config=json.dumps(config).encode())
    fresh = prepare_qlora(make_model("llama"), r=4, alpha=1, progress=False)
    load_adapter(fresh, good)
    assert _same_state(_lora_state(fresh), _lora_state(model))
