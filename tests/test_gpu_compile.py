"""The real Triton kernels compile for an H100/H200 (sm_90) with Triton's GPU compiler, on a machine without a GPU.

The interpreter that runs the other kernel tests here never generates code, so it accepts programs the GPU
compiler rejects (inconsistent return types, bad layouts) and never sees bf16 dots or shared-memory use.
Each kernel is compiled to a cubin (no launch) for a few representative launches: attention forward, dK/dV,
dQ and the delta pre-pass in fp16 and bf16 at head dims 64 and 128 with and without every mask option (plus
packed sequences, a one-row decode and fp32 inputs), and the NF4 matmul / dequantize kernels. Tiles are each
autotune list's first (default) config, the one FASTLLM_AUTOTUNE=0 launches; the last test checks that switch.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from _triton_compile import SM90_SHARED_LIMIT, KernelSpec, compile_for_gpu, python_without_interpreter

from fastllm.kernels import attention_bwd, attention_decode, attention_fwd

# fastllm.kernels re-exports the function nf4_matmul under the module's name
nf4_matmul = importlib.import_module("fastllm.kernels.nf4_matmul")

ATTN = "fastllm.kernels.attention_fwd:_attention_fwd_kernel"
DKDV = "fastllm.kernels.attention_bwd:_attention_dkdv_kernel"
DQ = "fastllm.kernels.attention_bwd:_attention_dq_kernel"
DELTA = "fastllm.kernels.attention_bwd:_attention_delta_kernel"

NO_MASKS = dict(HAS_LEFT=False, HAS_RIGHT=False, HAS_KPM=False, SOFTCAP=False, VARLEN=False)
# (dtype, head dim, flags): plain; every option at once (causal + window = both window sides); softcap alone;
# packed sequences; decode (one query row) with padding; fp32 inputs (exact fp32 dots, their own small tiles).
ATTENTION_CASES = {
    "fp16-d64-plain": ("fp16", 64, NO_MASKS),
    "bf16-d128-plain": ("bf16", 128, NO_MASKS),
    "fp16-d64-causal-window-softcap-padding": ("fp16", 64, {**NO_MASKS, "HAS_LEFT": True, "HAS_RIGHT": True,
                                                            "HAS_KPM": True, "SOFTCAP": True}),
    "bf16-d128-causal-window-softcap-padding": ("bf16", 128, {**NO_MASKS, "HAS_LEFT": True, "HAS_RIGHT": True,
                                                              "HAS_KPM": True, "SOFTCAP": True}),
    "bf16-d64-softcap": ("bf16", 64, {**NO_MASKS, "SOFTCAP": True}),
    "fp16-d128-varlen-causal-softcap": ("fp16", 128, {**NO_MASKS, "HAS_RIGHT": True, "SOFTCAP": True, "VARLEN": True}),
    "bf16-d128-decode-causal-padding": ("bf16", 128, {**NO_MASKS, "HAS_RIGHT": True, "HAS_KPM": True}),
    "fp32-d64-causal-softcap": ("fp32", 64, {**NO_MASKS, "HAS_RIGHT": True, "SOFTCAP": True}),
}  # fmt: skip
# Triton compiles an int argument equal to 1 as a constant: one query row (decode) is its own specialization.
DECODE = {"seqlen_q": 1}


def attention_types(dtype: str) -> dict[str, str]:
    """Argument types of every attention kernel: tensors in ``dtype``, fp32 row statistics, int32 mask data."""
    types = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
    types.update({name: "*fp32" for name in ("lse_ptr", "delta_ptr", "dlse_ptr")})
    types.update({name: "*i32" for name in ("kv_lo_ptr", "kv_hi_ptr", "cu_seqlens_q", "cu_seqlens_k")})
    types.update({name: "fp32" for name in ("scale", "qk_scale", "cap_scale")})
    return {**types, "kpm_ptr": "*u8"}


# Row strides of (B, H, S, D) / (total, H, D) tensors are multiples of the head dim; Triton specializes them so.
STRIDES = [f"stride_{t}{axis}" for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "d") for axis in "bhs"]


def attention_specs() -> list[KernelSpec]:
    specs = []
    for case, (dtype, dim, flags) in ATTENTION_CASES.items():
        fp32 = dtype == "fp32"  # exact fp32 dots, as the launcher asks for fp32 inputs
        ones = DECODE if "decode" in case else {}
        types = {**attention_types(dtype), **dict.fromkeys(ones, "constexpr")}
        constexprs = {**flags, **ones, "PRECISION": "ieee" if fp32 else "tf32", "BLOCK_D": dim}
        for kernel, tiles in ((ATTN, attention_fwd.forward_tiles), (DKDV, attention_bwd.dkdv_tiles),
                              (DQ, attention_bwd.dq_tiles)):  # fmt: skip
            block_m, block_n, warps, stages = tiles(dim, fp32)[0]
            tile = {"BLOCK_M": block_m, "BLOCK_N": block_n}
            name = f"{kernel.split(':_')[1]}-{case}"
            specs.append(KernelSpec(name, kernel, types, {**constexprs, **tile}, warps, stages, STRIDES))
        delta = dict(HAS_DLSE=True, VARLEN=flags["VARLEN"], BLOCK_M=64, BLOCK_D=dim, **ones)
        specs.append(KernelSpec(f"attention_delta_kernel-{case}", DELTA, types, delta, 4, 1, STRIDES))
    return specs


def nf4_specs() -> list[KernelSpec]:
    """Forward (split-K decode and tiled GEMM), backward and dequantize; 16-bit dtypes and fp32 with exact dots."""
    scales = {"data_ptr": "*u8", "absmax_ptr": "*u8", "nested_ptr": "*fp32", "offset_ptr": "*fp32",
              "dmap_ptr": "*fp32", "code_ptr": "*fp32"}  # fmt: skip
    specs = []
    for dtype, (dot_fp32, precision) in (("fp16", (False, None)), ("bf16", (False, None)), ("fp32", (True, "ieee"))):
        quant = {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "DOT_FP32": dot_fp32, "DOT_PRECISION": precision}
        for kind in ("small_m", "large_m", "backward"):
            bm, bn, bk, split, warps, stages = nf4_matmul.tile_specs(kind, dot_fp32)[0]
            tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}
            if kind == "backward":
                kernel, types = "_backward_kernel", {"grad_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
                constexprs = {**quant, **tiles}
            else:
                out = "*fp32" if split > 1 else f"*{dtype}"
                kernel, types = "_forward_kernel", {"x_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": out}
                constexprs = {"HAS_BIAS": True, **quant, **tiles}
            kernel = f"fastllm.kernels.nf4_matmul:{kernel}"
            specs.append(
                KernelSpec(f"nf4-{kind}-{dtype}", kernel, {**scales, **types}, constexprs, warps, stages, ["K"])
            )
    dequant = {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "BLOCK_N": 32, "BLOCK_K": 64}
    kernel = "fastllm.kernels.nf4_dequant:_dequantize_kernel"
    no_fma = {"enable_fp_fusion": False}  # as nf4_dequantize launches it
    specs.append(
        KernelSpec("nf4-dequantize-bf16", kernel, {**scales, "out_ptr": "*bf16"}, dequant, 4, 3, ["K"], no_fma)
    )
    return specs


# Split-KV decode: (dtype, head dim, GQA group, Sq, flags) -> the decode kernel's GPU tile for that launch.
DECODE_CASES = {
    "bf16-d128-g4-sq1-causal-padding": ("bf16", 128, 4, 1, {"HAS_RIGHT": True, "HAS_KPM": True}),
    "fp16-d128-g8-sq8-window-softcap": ("fp16", 128, 8, 8, {"HAS_LEFT": True, "HAS_RIGHT": True, "SOFTCAP": True}),
    "bf16-d256-g8-sq4-all": ("bf16", 256, 8, 4, {"HAS_LEFT": True, "HAS_RIGHT": True, "HAS_KPM": True,
                                                 "SOFTCAP": True}),
    "fp32-d64-g4-sq16-causal": ("fp32", 64, 4, 16, {"HAS_RIGHT": True}),
}  # fmt: skip
DECODE_SPLIT = "fastllm.kernels.attention_decode:_decode_split_kernel"
DECODE_COMBINE = "fastllm.kernels.attention_decode:_decode_combine_kernel"


def decode_specs() -> list[KernelSpec]:
    specs = []
    for case, (dtype, dim, group, sq, flags) in DECODE_CASES.items():
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        launch = attention_fwd.AttentionLaunch(1, group, dim, sq, 4096, 1.0, 0.0, -1, -1, torch_dtype)
        _, block_m, block_n, warps = attention_decode.decode_tile(launch, sq, interpret=False)
        types = {**attention_types(dtype), "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
        masks = {k: v for k, v in NO_MASKS.items() if k != "VARLEN"}
        tile = {"BLOCK_D": dim, "BLOCK_M": block_m, "BLOCK_N": block_n}
        constexprs = {**masks, **flags, **tile, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        specs.append(KernelSpec(f"decode_split-{case}", DECODE_SPLIT, types, constexprs, warps, 2, STRIDES))
        combine = {"BLOCK_S": 64, "BLOCK_D": dim}
        specs.append(KernelSpec(f"decode_combine-{case}", DECODE_COMBINE, types, combine, 4, 1, STRIDES))
    return specs


SPECS = attention_specs() + nf4_specs() + decode_specs()


@pytest.fixture(scope="module")
def compiled():
    """All specs compiled in one subprocess (one Python + Triton start-up for the whole file)."""
    return compile_for_gpu(SPECS)


@pytest.mark.parametrize("name", [spec.name for spec in SPECS])
def test_kernel_compiles_for_sm90(compiled, name):
    result = compiled[name]
    assert result.error is None, f"{name} does not compile for sm_90:\n{result.error}"
    assert result.shared <= SM90_SHARED_LIMIT, f"{name} needs {result.shared} B of shared memory"


# Prints the configs each autotuner of a GPU process would try, per head-dim bucket / dtype kind / NF4 kernel kind.
_SHOW_CONFIGS = """
import importlib, json, torch
af = importlib.import_module("fastllm.kernels.attention_fwd")
ab = importlib.import_module("fastllm.kernels.attention_bwd")
mm = importlib.import_module("fastllm.kernels.nf4_matmul")
shown = {}
for dim in (64, 128, 256):
    for dtype in (torch.float16, torch.float32):
        launch = af.AttentionLaunch(1, 1, dim, 1, 1, 1.0, 0.0, -1, -1, dtype)
        for name, tuner in (("forward", af._forward_tuner), ("dkdv", ab._dkdv_tuner), ("dq", ab._dq_tuner)):
            configs = tuner(launch).configs
            shown[f"{name}-{dim}-{dtype == torch.float32}"] = [
                [c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages] for c in configs
            ]
for kind in ("small_m", "large_m", "backward"):
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
    for kind in ("small_m", "large_m", "backward"):
        for fp32 in (False, True):
            expected[f"nf4-{kind}-{fp32}"] = nf4_matmul.tile_specs(kind, fp32)
    expected = {key: [list(t) for t in (tiles[:1] if autotune == "0" else tiles)] for key, tiles in expected.items()}
    assert shown == expected
