"""Every autotune config of every Triton kernel compiles for an H100/H200 (sm_90), spill-free, on a machine
without a GPU.

The interpreter that runs the other kernel tests here never generates code, so it accepts programs the GPU
compiler rejects (inconsistent return types, bad layouts) and never sees bf16 dots, register pressure or
shared-memory use. Each kernel is compiled to a cubin (no launch) with Triton's own compiler and ptxas, all
in one subprocess, and ptxas' report must show no register spill and shared memory within the sm_90 limit.

What is compiled (``KERNELS``, one entry per kernel and launch setting, each with the configs to compile):
- every config of every autotune list, at the heaviest launch that uses the list: the largest head dim of
  its head-dim bucket with every mask option on (attention), bf16 or fp32 inputs;
- the default (first) config over the launch variants: attention in fp16 and bf16, head dims 64 and 128,
  each mask option alone and together, packed sequences, one-row decode, fp32; NF4 in fp16, bf16, fp32.
The last test checks that the autotuners try exactly these lists (FASTLLM_AUTOTUNE=0: the first entry).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field

import pytest
import torch
from _triton_compile import SM90_SHARED_LIMIT, KernelSpec, compile_for_gpu, python_without_interpreter

from fastllm.kernels import attention_bwd, attention_decode, attention_fwd, cross_entropy_fused

nf4_fused = importlib.import_module("fastllm.kernels.nf4_fused")
nf4_dense = importlib.import_module("fastllm.kernels.nf4_dense")


@dataclass
class Entry:
    """One kernel in one launch setting, compiled once per config.

    ``configs``: (tile constexprs, num_warps, num_stages) as the kernel's autotuner builds them. The rest is
    :class:`KernelSpec`'s: argument types, the other constexprs, integer arguments aligned to 16, options.
    """

    name: str
    kernel: str
    types: dict[str, str]
    constexprs: dict[str, object]
    configs: list[tuple[dict[str, int], int, int]]
    aligned: list[str] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)

    def specs(self) -> list[KernelSpec]:
        out = []
        for tile, warps, stages in self.configs:
            label = "-".join(f"{k.removeprefix('BLOCK_').lower()}{v}" for k, v in tile.items())
            name = f"{self.name}[{label}-w{warps}-s{stages}]"
            constexprs = {**self.constexprs, **tile}
            out.append(KernelSpec(name, self.kernel, self.types, constexprs, warps, stages, self.aligned, self.options))
        return out


# ---- attention ---------------------------------------------------------------------------------------------

ATTN = "fastllm.kernels.attention_fwd:_attention_fwd_kernel"
DKDV = "fastllm.kernels.attention_bwd:_attention_dkdv_kernel"
DQ = "fastllm.kernels.attention_bwd:_attention_dq_kernel"
DELTA = "fastllm.kernels.attention_bwd:_attention_delta_kernel"
ATTENTION_TUNED = ((ATTN, attention_fwd.forward_tiles), (DKDV, attention_bwd.dkdv_tiles), (DQ, attention_bwd.dq_tiles))
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)  # BLOCK_D of the supported head dims (96 runs in a 128 block)

NO_MASKS = dict(HAS_LEFT=False, HAS_RIGHT=False, HAS_KPM=False, SOFTCAP=False, VARLEN=False)
EVERY_MASK = {**NO_MASKS, "HAS_LEFT": True, "HAS_RIGHT": True, "HAS_KPM": True, "SOFTCAP": True}
# (dtype, head dim, flags): plain; every option at once (causal + window = both window sides); softcap alone;
# packed sequences; decode (one query row) with padding; fp32 inputs (exact fp32 dots, their own small tiles).
ATTENTION_CASES = {
    "fp16-d64-plain": ("fp16", 64, NO_MASKS),
    "bf16-d128-plain": ("bf16", 128, NO_MASKS),
    "fp16-d64-causal-window-softcap-padding": ("fp16", 64, EVERY_MASK),
    "bf16-d128-causal-window-softcap-padding": ("bf16", 128, EVERY_MASK),
    "bf16-d64-softcap": ("bf16", 64, {**NO_MASKS, "SOFTCAP": True}),
    "fp16-d128-varlen-causal-softcap": ("fp16", 128, {**NO_MASKS, "HAS_RIGHT": True, "SOFTCAP": True, "VARLEN": True}),
    "bf16-d128-decode-causal-padding": ("bf16", 128, {**NO_MASKS, "HAS_RIGHT": True, "HAS_KPM": True}),
    "fp32-d64-causal-softcap": ("fp32", 64, {**NO_MASKS, "HAS_RIGHT": True, "SOFTCAP": True}),
}  # fmt: skip
# Triton compiles an int argument equal to 1 as a constant: one query row (decode) is its own specialization.
DECODE = {"seqlen_q": 1}
# Row strides of (B, H, S, D) / (total, H, D) tensors are multiples of the head dim; Triton specializes them so.
STRIDES = [f"stride_{t}{axis}" for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "d") for axis in "bhs"]


def attention_types(dtype: str) -> dict[str, str]:
    """Argument types of every attention kernel: tensors in ``dtype``, fp32 row statistics, int32 mask data."""
    types = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
    types.update({name: "*fp32" for name in ("lse_ptr", "delta_ptr", "dlse_ptr")})
    types.update({name: "*i32" for name in ("kv_lo_ptr", "kv_hi_ptr", "cu_seqlens_q", "cu_seqlens_k")})
    types.update({name: "fp32" for name in ("scale", "qk_scale", "cap_scale")})
    return {**types, "kpm_ptr": "*u8"}


def attention_configs(tiles: list[tuple[int, int, int, int]]) -> list[tuple[dict[str, int], int, int]]:
    return [({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages) for bm, bn, warps, stages in tiles]


def attention_entries() -> list[Entry]:
    entries = []
    for case, (dtype, dim, flags) in ATTENTION_CASES.items():
        fp32 = dtype == "fp32"  # exact fp32 dots, as the launcher asks for fp32 inputs
        ones = DECODE if "decode" in case else {}
        types = {**attention_types(dtype), **dict.fromkeys(ones, "constexpr")}
        constexprs = {**flags, **ones, "PRECISION": "ieee" if fp32 else "tf32", "BLOCK_D": dim}
        for kernel, tiles in ATTENTION_TUNED:
            name = f"{kernel.split(':_')[1]}-{case}"
            entries.append(Entry(name, kernel, types, constexprs, attention_configs(tiles(dim, fp32)[:1]), STRIDES))
        delta = dict(HAS_DLSE=True, VARLEN=flags["VARLEN"], BLOCK_D=dim, **ones)
        entries.append(Entry(f"attention_delta_kernel-{case}", DELTA, types, delta, [({"BLOCK_M": 64}, 4, 1)], STRIDES))
    # Every tile of every list, once, at the largest BLOCK_D that takes the list (the most registers).
    for kernel, tiles in ATTENTION_TUNED:
        for fp32, dtype in ((False, "bf16"), (True, "fp32")):
            heaviest = {tuple(tiles(dim, fp32)): dim for dim in HEAD_DIM_BLOCKS}
            for tile_list, dim in heaviest.items():
                constexprs = {**EVERY_MASK, "PRECISION": "ieee" if fp32 else "tf32", "BLOCK_D": dim}
                name = f"{kernel.split(':_')[1]}-every-tile-{dtype}-d{dim}-every-mask"
                configs = attention_configs(list(tile_list))
                entries.append(Entry(name, kernel, attention_types(dtype), constexprs, configs, STRIDES))
    return entries


# ---- NF4 ---------------------------------------------------------------------------------------------------

NF4_SCALES = {"data_ptr": "*u8", "absmax_ptr": "*u8", "nested_ptr": "*fp32", "offset_ptr": "*fp32",
              "dmap_ptr": "*fp32", "pairs_ptr": "*fp32"}  # fmt: skip
NO_FMA = {"enable_fp_fusion": False}  # as the launchers compile them (the exact double-quant scale decode)
NF4_KINDS = ("small_m", "split_k", "large_m", "backward")


def nf4_configs(kind: str, fp32: bool) -> list[tuple[dict[str, int], int, int]]:
    tiles = nf4_fused.tile_specs(kind, fp32)
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
    return [(dict(zip(keys, tile[:4], strict=True)), tile[4], tile[5]) for tile in tiles]


def nf4_entries() -> list[Entry]:
    """Forward (direct GEMV, split-K GEMV atomic and deterministic, tiled GEMM) and backward: every config in bf16
    and fp32 (exact dots), the default config in fp16; every tile of the dequantize kernel, both lookups, in bf16."""
    entries = []
    for dtype, (dot_fp32, precision), every in (
        ("bf16", (False, None), True), ("fp32", (True, "ieee"), True), ("fp16", (False, None), False),
    ):  # fmt: skip
        quant = {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "DOT_FP32": dot_fp32, "DOT_PRECISION": precision}
        # (tile kind, GEMV output mode: 0 stores y, 1 adds fp32 partials atomically, 2 stores them to sum in order)
        for kind, mode in (("small_m", 0), ("split_k", 1), ("split_k", 2), ("large_m", 0), ("backward", 0)):
            configs = nf4_configs(kind, dot_fp32)
            configs = configs if every else configs[:1]
            if kind == "backward":
                kernel, types = "_backward_kernel", {"grad_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
                constexprs = quant
            else:
                out = "*fp32" if mode else f"*{dtype}"
                kernel, types = "_forward_kernel", {"x_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": out}
                constexprs = {"HAS_BIAS": True, **quant, "OUT_MODE": mode}
            name = f"nf4-{kind}{'-deterministic' if mode == 2 else ''}-{dtype}"
            entries.append(Entry(name, f"fastllm.kernels.nf4_fused:{kernel}", {**NF4_SCALES, **types}, constexprs,
                                 configs, ["K"], NO_FMA))  # fmt: skip
    for pair in (True, False):
        dequant = {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "PAIR_LOOKUP": pair, "BF16_BY_BITS": False}
        tiles = [tile for tile in nf4_dense.DENSE_TILES if tile[3] == pair]
        configs = [({"BLOCK_N": bn, "BLOCK_K": bk}, warps, 1) for bn, bk, warps, _ in tiles]
        name = f"nf4-dequantize-bf16-{'pairs' if pair else 'nibbles'}"
        entries.append(Entry(name, "fastllm.kernels.nf4_dense:_dequantize_kernel", {**NF4_SCALES, "out_ptr": "*bf16"},
                             dequant, configs, ["K"], NO_FMA))  # fmt: skip
    return entries


# ---- fused linear cross-entropy ----------------------------------------------------------------------------


def cross_entropy_entries() -> list[Entry]:
    """The fused linear cross-entropy's row pass over 16-bit and fp32 logits, plain and with every option."""
    block_v, warps = cross_entropy_fused.GPU_ROW_CONFIG
    kernel = "fastllm.kernels.cross_entropy_fused:_rows_kernel"
    entries = []
    for dtype in ("bf16", "fp16", "fp32"):
        types = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "scale_ptr": "*fp32", "losses_ptr": "*fp32",
                 "smoothing": "fp32", "cap": "fp32"}  # fmt: skip
        for name, on, grad in (("loss-only", False, False), ("grad", False, True), ("all-options", True, True)):
            flags = {"HAS_SCALE": on, "SOFTCAP": on, "SMOOTHING": on, "GRAD": grad}
            configs = [({"BLOCK_V": block_v}, warps, 3)]
            entries.append(Entry(f"cross-entropy-rows-{name}-{dtype}", kernel, types, flags, configs))
    return entries


# ---- split-KV decode attention ---------------------------------------------------------------------------

# (dtype, head dim, GQA group, Sq, flags) -> the decode kernel's GPU tile for that launch.
DECODE_CASES = {
    "bf16-d128-g4-sq1-causal-padding": ("bf16", 128, 4, 1, {"HAS_RIGHT": True, "HAS_KPM": True}),
    "fp16-d128-g8-sq8-window-softcap": ("fp16", 128, 8, 8, {"HAS_LEFT": True, "HAS_RIGHT": True, "SOFTCAP": True}),
    "bf16-d256-g8-sq4-all": ("bf16", 256, 8, 4, {"HAS_LEFT": True, "HAS_RIGHT": True, "HAS_KPM": True,
                                                 "SOFTCAP": True}),
    "fp32-d64-g4-sq16-causal": ("fp32", 64, 4, 16, {"HAS_RIGHT": True}),
}  # fmt: skip
DECODE_SPLIT = "fastllm.kernels.attention_decode:_decode_split_kernel"
DECODE_COMBINE = "fastllm.kernels.attention_decode:_decode_combine_kernel"


def decode_entries() -> list[Entry]:
    """The split and combine kernels of split-KV decoding, at the tile each case launches on a GPU."""
    entries = []
    for case, (dtype, dim, group, sq, flags) in DECODE_CASES.items():
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        launch = attention_fwd.AttentionLaunch(1, group, dim, sq, 4096, 1.0, 0.0, -1, -1, torch_dtype)
        _, block_m, block_n, warps = attention_decode.decode_tile(launch, sq, interpret=False)
        types = {**attention_types(dtype), "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
        masks = {k: v for k, v in NO_MASKS.items() if k != "VARLEN"}
        constexprs = {**masks, **flags, "BLOCK_D": dim, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        tile = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        entries.append(Entry(f"decode_split-{case}", DECODE_SPLIT, types, constexprs, [(tile, warps, 2)], STRIDES))
        combine = [({"BLOCK_S": 64}, 4, 1)]
        entries.append(Entry(f"decode_combine-{case}", DECODE_COMBINE, types, {"BLOCK_D": dim}, combine, STRIDES))
    return entries


# ---- every kernel: append the entries of a new kernel here ----------------------------------------------------
KERNELS: list[Entry] = [
    *attention_entries(),
    *nf4_entries(),
    *cross_entropy_entries(),
    *decode_entries(),
]


def _unique_specs(entries: list[Entry]) -> list[KernelSpec]:
    # A default tile may also be in an every-tile entry with the same launch: compile it once.
    specs, seen = [], set()
    for spec in (s for entry in entries for s in entry.specs()):
        key = json.dumps([spec.kernel, spec.types, spec.constexprs, spec.num_warps, spec.num_stages, spec.options],
                         sort_keys=True, default=str)  # fmt: skip
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    return specs


SPECS = _unique_specs(KERNELS)


@pytest.fixture(scope="module")
def compiled(request):
    """The specs of the selected tests, compiled in one subprocess (one Python + Triton start-up for the file)."""
    wanted = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_kernel_compiles_for_sm90_without_spills"
    }
    return compile_for_gpu([spec for spec in SPECS if spec.name in wanted])


@pytest.mark.parametrize("name", [spec.name for spec in SPECS])
def test_kernel_compiles_for_sm90_without_spills(compiled, name):
    result = compiled[name]
    assert result.error is None, f"{name} does not compile for sm_90:\n{result.error}"
    assert result.shared <= SM90_SHARED_LIMIT, f"{name} needs {result.shared} B of shared memory"
    assert result.registers > 0, f"{name}: no ptxas report was read"
    assert result.spill_stores == 0 and result.spill_loads == 0, (
        f"{name} spills registers: {result.spill_stores} B stores, {result.spill_loads} B loads "
        f"({result.registers} registers)"
    )


def test_every_autotune_config_is_compiled():
    """Each autotune list of each kernel appears whole among the compiled configs (the lists the tuners use)."""
    compiled = {(s.kernel, s.num_warps, s.num_stages, *(s.constexprs.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K",
                "SPLIT_K"))) for s in SPECS}  # fmt: skip
    for kernel, tiles in ATTENTION_TUNED:
        for dim in HEAD_DIM_BLOCKS:
            for fp32 in (False, True):
                for bm, bn, warps, stages in tiles(dim, fp32):
                    assert (kernel, warps, stages, bm, bn, None, None) in compiled, (kernel, dim, fp32, bm, bn)
    for kind in NF4_KINDS:
        kernel = "fastllm.kernels.nf4_fused:" + ("_backward_kernel" if kind == "backward" else "_forward_kernel")
        for fp32 in (False, True):
            for bm, bn, bk, split, warps, stages in nf4_fused.tile_specs(kind, fp32):
                assert (kernel, warps, stages, bm, bn, bk, split) in compiled, (kind, fp32, bm, bn, bk, split)


# Prints the configs each autotuner of a GPU process would try, per head-dim bucket / dtype kind / NF4 kernel kind.
_SHOW_CONFIGS = """
import importlib, json, torch
af = importlib.import_module("fastllm.kernels.attention_fwd")
ab = importlib.import_module("fastllm.kernels.attention_bwd")
mm = importlib.import_module("fastllm.kernels.nf4_fused")
shown = {}
for dim in (64, 128, 256):
    for dtype in (torch.float16, torch.float32):
        launch = af.AttentionLaunch(1, 1, dim, 1, 1, 1.0, 0.0, -1, -1, dtype)
        for name, tuner in (("forward", af._forward_tuner), ("dkdv", ab._dkdv_tuner), ("dq", ab._dq_tuner)):
            configs = tuner(launch).configs
            shown[f"{name}-{dim}-{dtype == torch.float32}"] = [
                [c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages] for c in configs
            ]
for kind in ("small_m", "split_k", "large_m", "backward"):
    for fp32 in (False, True):
        shown[f"nf4-{kind}-{fp32}"] = [
            [*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")), c.num_warps, c.num_stages]
            for c in mm._tuner(kind, fp32).configs
        ]
print(json.dumps(shown))
"""


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_fastllm_autotune_switch(autotune):
    """FASTLLM_AUTOTUNE=0 leaves every GPU autotuner its first (default) config; otherwise it gets the whole list."""
    proc = python_without_interpreter(["-c", _SHOW_CONFIGS], env={"FASTLLM_AUTOTUNE": autotune})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {}
    for dim in (64, 128, 256):
        for fp32 in (False, True):
            for name, tiles in (("forward", attention_fwd.forward_tiles), ("dkdv", attention_bwd.dkdv_tiles),
                                ("dq", attention_bwd.dq_tiles)):  # fmt: skip
                expected[f"{name}-{dim}-{fp32}"] = tiles(dim, fp32)
    for kind in NF4_KINDS:
        for fp32 in (False, True):
            expected[f"nf4-{kind}-{fp32}"] = nf4_fused.tile_specs(kind, fp32)
    expected = {key: [list(t) for t in (tiles[:1] if autotune == "0" else tiles)] for key, tiles in expected.items()}
    assert shown == expected
