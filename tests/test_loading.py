"""fastllm.loading: quantize on load, bitsandbytes 4-bit checkpoints both ways, bad checkpoints, the memory plan.

Every checkpoint is written by the test from a tiny random-init model (tests/_tiny_models.py) in bf16.
References: ``prepare_qlora`` on the same model loaded dense (bytes), transformers + bitsandbytes
(bytes and logits; bitsandbytes quantizes on the CPU here).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from _metrics import rel_err
from _tiny_models import (
    ARCHS,
    MODEL_CLASSES,
    logits,
    make_batch,
    make_model,
    tiny_config,
    with_dequantized_weights,
)
from safetensors.torch import save_file
from torch import nn

import fastllm
from fastllm import LinearNF4, LoraLinear, NF4Config, prepare_qlora
from fastllm.loading.memory_plan import memory_plan
from fastllm.nn.prepare import find_targets
from fastllm.ops.linear_cross_entropy import chunk_rows

SHARD = "40KB"  # several shards even for the tiny models


def write_bf16(arch: str, path: Path, **overrides) -> nn.Module:
    """Save the tiny ``arch`` model in bf16 (sharded) to ``path``; returns the bf16 model."""
    model = make_model(arch, **overrides).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=SHARD)
    return model


def nf4_layers(model: nn.Module) -> dict[str, LinearNF4]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearNF4)}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].cpu(), b[key].cpu()), key


def without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prepare_qlora'd state dict as the plain model's: base_layer keys renamed, LoRA matrices dropped."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}


def bnb_config(double_quant: bool = True) -> T.BitsAndBytesConfig:
    return T.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def run_python(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter (outside the repository root, which must not be on sys.path)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# -- quantize on load ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_on_load_equals_prepare_qlora(arch, tmp_path):
    dense = write_bf16(arch, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded
    model = fastllm.from_pretrained(tmp_path)
    reference = prepare_qlora(copy.deepcopy(dense), r=4, progress=False)

    # Same layers quantized (the output head, vision tower and projector stay dense), same bytes everywhere.
    assert set(nf4_layers(model)) == set(find_targets(dense))
    assert_same_tensors(model.state_dict(), without_lora(reference.state_dict()))
    assert all(not p.requires_grad for m in nf4_layers(model).values() for p in m.parameters())

    # The same through transformers' own from_pretrained with the registered quantizer.
    via_hf = MODEL_CLASSES[arch].from_pretrained(tmp_path, quantization_config=NF4Config(), dtype=torch.bfloat16)
    assert_same_tensors(via_hf.state_dict(), model.state_dict())

    # The loaded model computes with its NF4 weights: in fp32 it equals the dense model holding them dequantized.
    model32 = fastllm.from_pretrained(tmp_path, dtype=torch.float32, compute_dtype=torch.float32)
    twin = with_dequantized_weights(copy.deepcopy(dense).float(), reference)
    batch = make_batch(arch)
    assert rel_err(logits(model32, batch), logits(twin, batch)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_embeddings_stay_tied(arch, tmp_path):
    write_bf16(arch, tmp_path, tie_word_embeddings=True)
    model = fastllm.from_pretrained(tmp_path)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(head) is nn.Linear
    assert head.weight.data_ptr() == embed.weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prepare_qlora_wraps_loaded_layers_without_requantizing(arch, tmp_path):
    write_bf16(arch, tmp_path)
    model = fastllm.from_pretrained(tmp_path)
    loaded = nf4_layers(model)
    prepare_qlora(model, r=4, progress=False)
    for name, layer in loaded.items():
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, LoraLinear) and wrapper.base_layer is layer
        assert wrapper.fan_in_fan_out == (arch == "gpt2")  # GPT-2's Conv1D orientation survives the load
    batch = make_batch(arch)
    model(**batch).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith((".lora_A", ".lora_B")) for n in trained)


def test_device_map(device, tmp_path):
    write_bf16("llama", tmp_path)
    on_cpu = fastllm.from_pretrained(tmp_path, device_map="cpu")
    model = fastllm.from_pretrained(tmp_path, device_map={"": str(device)})
    assert {t.device.type for t in model.state_dict().values()} == {device.type}
    assert set(nf4_layers(model)) == set(nf4_layers(on_cpu))
    # Quantized on the device the layer landed on: the same bytes as on the CPU.
    assert_same_tensors(model.state_dict(), on_cpu.state_dict())


def test_nf4_options_reach_the_layers(tmp_path):
    write_bf16("llama", tmp_path)
    model = fastllm.from_pretrained(
        tmp_path, blocksize=128, double_quant=False, compute_dtype=torch.float32, target_modules=["q_proj"]
    )
    layers = nf4_layers(model)
    assert set(layers) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    for layer in layers.values():
        assert layer.blocksize == 128 and layer.nested_absmax is None and layer.compute_dtype == torch.float32
        assert layer.absmax.dtype == torch.float32
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)


def test_nf4config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        NF4Config(blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Config(compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="double_quant"):
        NF4Config(double_quant=1)
    with pytest.raises(TypeError, match="unexpected"):
        NF4Config(bits=4)


# -- bitsandbytes checkpoints both ways ----------------------------------------------------------


def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(tmp_path):
    cases = {"llama": True, "gpt2": False, "llava": True}  # arch -> double quantization
    expected = {}
    for arch, double_quant in cases.items():
        write_bf16(arch, tmp_path / f"{arch}-bf16")
        bnb_model = MODEL_CLASSES[arch].from_pretrained(
            tmp_path / f"{arch}-bf16", quantization_config=bnb_config(double_quant), dtype=torch.bfloat16
        )
        bnb_model.save_pretrained(tmp_path / arch, max_shard_size=SHARD)
        expected[arch] = bnb_model.state_dict()
    code = f"""
import sys
sys.modules["bitsandbytes"] = None  # any import of bitsandbytes now raises ImportError
import torch, fastllm
for arch in {list(cases)!r}:
    model = fastllm.from_pretrained({str(tmp_path)!r} + "/" + arch)
    layers = [m for m in model.modules() if isinstance(m, fastllm.LinearNF4)]
    assert layers, arch
    torch.save(model.state_dict(), {str(tmp_path)!r} + "/" + arch + ".pt")
print(sys.modules["bitsandbytes"] is None)
"""
    assert run_python(code, tmp_path).strip().endswith("True")
    for arch in cases:
        assert_same_tensors(torch.load(tmp_path / f"{arch}.pt"), expected[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_checkpoint_loads_in_bitsandbytes(arch, tmp_path):
    import bitsandbytes as bnb

    write_bf16(arch, tmp_path / "bf16")
    # fp32 compute on both sides (the Triton interpreter's bf16 dot is not exact); the same NF4 bytes as in bf16.
    model = fastllm.from_pretrained(tmp_path / "bf16", dtype=torch.float32, compute_dtype=torch.float32)
    out = tmp_path / "nf4"
    fastllm.save_pretrained(model, out, max_shard_size=SHARD)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert (out / "model.safetensors.index.json").is_file()

    theirs = MODEL_CLASSES[arch].from_pretrained(out, device_map="cpu", dtype=torch.float32)
    bnb_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(bnb_layers) == set(nf4_layers(model))
    for name, layer in nf4_layers(model).items():  # bitsandbytes holds our bytes
        assert_same_tensors(bnb_layers[name].state_dict(), layer.state_dict())
    batch = make_batch(arch)
    assert rel_err(logits(theirs, batch), logits(model, batch)) < 1e-5

    back = fastllm.from_pretrained(out, dtype=torch.float32)
    assert_same_tensors(back.state_dict(), model.state_dict())


def test_save_is_atomic(tmp_path):
    write_bf16("llama", tmp_path / "bf16")
    model = fastllm.from_pretrained(tmp_path / "bf16")
    out = tmp_path / "nf4"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    fastllm.save_pretrained(model, out)
    assert not (out / "stale.safetensors").exists()  # the directory is replaced as a whole
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def torn_save(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    model.save_pretrained = torn_save
    with pytest.raises(OSError, match="disk full"):
        fastllm.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "nf4"]  # no staging directory left


def test_save_refuses_models_it_cannot_write_as_bitsandbytes(tmp_path):
    with pytest.raises(ValueError, match="no LinearNF4"):
        fastllm.save_pretrained(make_model("llama"), tmp_path / "out")
    write_bf16("llama", tmp_path / "bf16")
    model = prepare_qlora(fastllm.from_pretrained(tmp_path / "bf16"), r=4, progress=False)
    with pytest.raises(ValueError, match="LoRA"):
        fastllm.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "quantization_config, method",
    [
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "fp4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
    ],
)
def test_other_quantization_methods_are_named(quantization_config, method, tmp_path):
    write_bf16("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=method):
        fastllm.from_pretrained(tmp_path)


# -- bad checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    write_bf16("llama", path)
    return path


@pytest.fixture
def broken(llama_checkpoint, tmp_path) -> Path:
    """A fresh copy of the sharded tiny Llama checkpoint to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(llama_checkpoint, path)
    return path


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def rewrite_index(path: Path, mapping: dict[str, str]) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = mapping
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_shard(broken):
    shard = weight_map(broken)["model.layers.1.mlp.down_proj.weight"]
    (broken / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}.*shard missing"):
        fastllm.from_pretrained(broken)


def test_truncated_shard(broken):
    shard = weight_map(broken)["model.layers.1.mlp.down_proj.weight"]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[:-100])
    with pytest.raises(ValueError, match=f"{shard}: tensor '.*' ends at byte .*truncated"):
        fastllm.from_pretrained(broken)


def test_index_names_a_tensor_its_shard_lacks(broken):
    mapping = weight_map(broken)
    key = "model.layers.0.self_attn.q_proj.weight"
    mapping[key] = next(s for s in set(mapping.values()) if s != mapping[key])
    rewrite_index(broken, mapping)
    with pytest.raises(ValueError, match=f"{mapping[key]}: the index .* names tensor '{key}'"):
        fastllm.from_pretrained(broken)


def test_shape_differs_from_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 144
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        fastllm.from_pretrained(broken)


@pytest.mark.parametrize(
    "key, value",
    [("model.layers.1.self_attn.q_proj.weight", float("nan")), ("model.embed_tokens.weight", float("inf"))],
)
def test_non_finite_weight(broken, key, value):
    shard = broken / weight_map(broken)[key]
    from safetensors.torch import load_file

    tensors = load_file(shard)
    tensors[key][3, 5] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{shard.name}: tensor '{key}' (holds|has) 1 non-finite"):
        fastllm.from_pretrained(broken)


@pytest.mark.parametrize(
    "key, message",
    [
        ("model.layers.1.mlp.up_proj.weight", r"no weight for 1 quantized layer.*'model\.layers\.1\.mlp\.up_proj'"),
        ("model.norm.weight", r"lacks 1 tensor.*'model\.norm\.weight'"),
    ],
)
def test_tensor_missing_from_checkpoint(broken, key, message):
    mapping = weight_map(broken)
    del mapping[key]
    rewrite_index(broken, mapping)
    with pytest.raises(ValueError, match=message):
        fastllm.from_pretrained(broken)


# -- memory plan -----------------------------------------------------------------------------------


def test_memory_plan_matches_a_loaded_model(tmp_path):
    write_bf16("llama", tmp_path)
    model = fastllm.from_pretrained(tmp_path)
    rows = {row.item.split(" (")[0].split(",")[0]: row.nbytes for row in memory_plan(tiny_config("llama"), r=4)}
    layers = nf4_layers(model)
    assert rows["base linear weights"] == sum(m.nbytes for m in layers.values())
    dense = [p for n, p in model.named_parameters() if n.rpartition(".")[0] not in layers]
    assert rows["embeddings"] == sum(p.numel() * p.element_size() for p in dense)
    prepare_qlora(model, r=4, progress=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["LoRA A"] == 4 * trainable and rows["AdamW moments"] == 8 * trainable
    assert rows["total"] == sum(v for k, v in rows.items() if k != "total")


def test_memory_plan_fused_loss_counts_one_chunk_of_logits():
    """With the fused loss the plan holds the chunk of logits the op really allocates (its own chunk size) and the
    hidden-state gradient; the full logits row is gone."""
    config = {**tiny_config("llama").to_dict(), "vocab_size": 50000}
    tokens, h = 8192, 64
    plain, fused = (memory_plan(config, tokens=tokens, fused_loss=f) for f in (False, True))
    assert plain[-2].nbytes == 2 * tokens * 50000 * 4
    rows = chunk_rows(tokens, h, 50000)
    assert 0 < rows < tokens and fused[-2].item.startswith("loss: one chunk")
    assert fused[-2].nbytes == 2 * (rows * 50000 + tokens * h)
    assert plain[-1].nbytes - fused[-1].nbytes == plain[-2].nbytes - fused[-2].nbytes
    assert [r.nbytes for r in plain[:-2]] == [r.nbytes for r in fused[:-2]]


def test_memory_plan_checkpointing_and_arguments():
    config = tiny_config("llama")
    act = lambda ckpt: next(r.nbytes for r in memory_plan(config, checkpointing=ckpt) if r.item.startswith("act"))
    # 2 layers: without checkpointing both blocks' saved tensors; with it block inputs + one block.
    h, m, kv, tokens = 64, 128, 32, 4096
    block = tokens * (9 * h + 2 * kv + 4 * m) * 2
    assert act(False) == 2 * block and act(True) == 2 * tokens * h * 2 + block
    with pytest.raises(ValueError, match="r must"):
        memory_plan(config, r=0)
    with pytest.raises(ValueError, match="lacks"):
        memory_plan({"hidden_size": 8})
