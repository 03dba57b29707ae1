"""Build fastllm and its C++ extension ``fastllm._C``.

The CPU sources always build, for the baseline of the architecture (the AVX2 / AVX-512 kernels are
picked at run time; FASTLLM_CPU_ISA=avx512|avx2|scalar forces one). The CUDA sources (csrc/*.cu, raw pointers, no torch
headers) build only where torch is a CUDA build and nvcc exists; set FASTLLM_NO_CUDA=1 to
skip them. ``kernels/`` installs as ``fastllm.kernels``.
"""

import glob
import os
import shutil

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - the README installs torch first
    raise SystemExit(
        "fastllm builds against an installed torch: pip install torch first, then pip install --no-build-isolation -e ."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FASTLLM_NO_CUDA") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return []
    # Baseline ISA only (no -march=native): the wheel must run on any x86-64 CPU. The AVX2 and
    # AVX-512 kernels are compiled by target pragmas in their own files (csrc/nf4_cpu_avx*.cpp) and
    # chosen at run time (csrc/nf4_cpu_isa.h). -ffp-contract=off: no multiply-add is fused where the
    # reference rounds twice, so every variant computes the same bytes.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++20"]
    if _want_cuda():
        cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        return [
            CUDAExtension(
                "fastllm._C",
                cpp + cu,
                define_macros=[("FASTLLM_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [CppExtension("fastllm._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])]


setup(
    packages=["fastllm", "fastllm.nn", "fastllm.integrations", "fastllm.kernels", "fastllm.ops"],
    package_dir={"fastllm": "fastllm", "fastllm.kernels": "kernels"},
    ext_modules=_extension(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
