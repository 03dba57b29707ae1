"""Compile Triton kernels for an NVIDIA GPU without one: Triton's real compiler, no launch.

The test process runs kernels in the interpreter (``tests/conftest.py``), where ``@triton.jit`` makes
interpreted functions the GPU compiler cannot take. So :func:`compile_for_gpu` hands a list of
:class:`KernelSpec` to a fresh Python process without ``TRITON_INTERPRET`` (this file run as a script),
which compiles each kernel through TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (Triton's bundled ptxas)
for the target and reports, per spec, the compiler's error, or the shared memory the kernel needs and
ptxas' own report of that compile (registers, spill stores / loads; ``ptxas -v``, which Triton prints with
TRITON_DUMP_PTXAS_LOG=1). That catches what the interpreter never checks: type rules of the code
generator, layouts, register allocation and spills, shared-memory use.

The subprocess compiles into a fresh Triton cache, so ptxas runs (and reports) for every spec; one ptxas
per kernel, as Triton runs it (the kernels' PTX cannot share one ptxas input: entry names and debug file
indices collide).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field

# Shared memory per block an H100/H200 (sm_90) kernel may use.
SM90_SHARED_LIMIT = 232448


@dataclass
class KernelSpec:
    """One compilation: ``module:name`` of a ``@triton.jit`` kernel (or an autotuner around one) and its launch.

    ``types`` gives each pointer argument's type (``"*fp16"``, ...) and each float argument's (``"fp32"``);
    every other non-constexpr argument is an ``i32``. ``constexprs`` holds every ``tl.constexpr`` value.
    ``aligned`` names integer arguments to compile as multiples of 16, as Triton specializes them at a launch
    (pointer arguments always are: torch allocations are 16-byte aligned).
    """

    name: str
    kernel: str
    types: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    aligned: list[str] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)


@dataclass
class CompileResult:
    """``error`` is None when the kernel compiled to a cubin; then ``shared`` is its shared memory in bytes and
    ``registers``, ``spill_stores`` and ``spill_loads`` (bytes) come from ptxas' report of that compile."""

    error: str | None
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas_report(text: str) -> dict[str, int] | None:
    """registers / spill_stores / spill_loads of the (one) entry function in a ``ptxas -v`` log, or None."""
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    if spills is None or registers is None:
        return None
    return {"registers": int(registers[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2])}


def python_without_interpreter(
    args: list[str], stdin: str = "", env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``python *args`` in a fresh process as on a GPU machine: TRITON_INTERPRET unset, so ``@triton.jit``
    builds real (compilable) kernels and the kernel modules pick their GPU configurations. ``env`` adds variables.
    It runs in tests/, so a ``-c`` script imports the installed fastllm, never the repository root's folders."""
    clean = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], input=stdin, env={**clean, **(env or {})}, cwd=os.path.dirname(__file__),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def compile_for_gpu(specs: list[KernelSpec], capability: int = 90) -> dict[str, CompileResult]:
    """Compile every spec for ``cuda`` sm_<capability> in one subprocess; results by spec name."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.json")
        request = json.dumps({"capability": capability, "specs": [dataclasses.asdict(s) for s in specs]})
        env = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": os.path.join(tmp, "triton-cache")}
        proc = python_without_interpreter([__file__, out_path], stdin=request, env=env, timeout=1800)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"compile subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path) as f:
            return {name: CompileResult(**result) for name, result in json.load(f).items()}


def compile_spec(spec: KernelSpec, capability: int = 90):
    """Compile one spec in this (non-interpreting) process; returns Triton's CompiledKernel (asm, metadata)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, _, attr = spec.kernel.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    while not isinstance(fn, triton.JITFunction):  # unwrap autotuners / heuristics
        fn = fn.fn
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        kind = spec.types.get(param.name, "i32")
        signature[param.name] = kind
        if kind.startswith("*") or param.name in spec.aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, spec.constexprs, attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def _main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    request = json.load(sys.stdin)
    results = {}
    for raw in request["specs"]:
        spec = KernelSpec(**raw)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # where Triton prints ptxas' report
                kernel = compile_spec(spec, request["capability"])
            report = parse_ptxas_report(log.getvalue())
            if report is None:
                raise RuntimeError(f"no ptxas report in Triton's output (TRITON_DUMP_PTXAS_LOG):\n{log.getvalue()}")
            results[spec.name] = {"error": None, "shared": int(kernel.metadata.shared), **report}
        except Exception as exc:  # report every failing kernel, not only the first
            cause = exc.__cause__ or exc
            text = "".join(traceback.format_exception_only(type(cause), cause))
            results[spec.name] = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}\n{text[-2000:]}"}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _main(sys.argv[1])
