// The instruction-set-specific CPU kernels of fastllm._C and their run-time dispatch.
//
// The extension is built for the baseline x86-64 (no -march=native): a wheel must run on any
// x86-64 CPU. The hot inner loops are compiled three times, each variant in its own translation
// unit with its own target (nf4_cpu_avx512.cpp, nf4_cpu_avx2.cpp via `#pragma GCC target`; the
// scalar variant in nf4_cpu.cpp with the baseline flags), and nf4_cpu.cpp picks one per process:
// the best the CPU supports, or the one named by FASTLLM_CPU_ISA=avx512|avx2|scalar.
//
// Every variant computes the same bytes: each kernel below specifies its arithmetic to the
// operation (which products are fused, the order of every sum), and each variant implements that
// specification; tests/test_isa.py checks quantize, dequantize and GEMV byte for byte across them.
//
// The ISA translation units see only this header, nf4.h's format constants and <immintrin.h>: no
// torch or standard-library header whose inline functions could be emitted with AVX-512
// instructions and picked by the linker for the baseline code.
#pragma once

#include <cstdint>

namespace fastllm::cpu {

struct IsaKernels {
  const char* name;  // "avx512", "avx2" or "scalar"

  // max |v[i]| over len fp32 values (as bits: |x| orders like an unsigned integer for finite x), and
  // the number of Inf/NaN among them added to *nonfinite.
  float (*block_absmax)(const float* v, int64_t len, int64_t* nonfinite);

  // One quantization block of len fp32 values -> (len + 1) / 2 packed bytes. Each value is scaled
  // (times the fp32 reciprocal 1 / max(absmax, kMinScale) for a full block, divided by it for the
  // short tail block), clamped to [-1, 1], and coded as the number of NF4 midpoints strictly below
  // it; two codes per byte, first in the high nibble, an odd tail padded with code 7.
  void (*quantize_block)(const float* v, int64_t len, float absmax, bool full, uint8_t* out);

  // Table lookup of packed nibbles: out[i] = table[nibble i] for i < len (high nibble first), with a
  // 16-entry table of fp32 values or of 16-bit patterns (bf16 / fp16). `p` points at element 0.
  void (*lookup_f32)(const uint8_t* p, int64_t len, const float* table, float* out);
  void (*lookup_u16)(const uint8_t* p, int64_t len, const uint16_t* table, uint16_t* out);

  // y[m, n] for m < M and n in [n0, n1) (y row stride N) = the NF4 GEMV x (M, K; row stride ldx,
  // fp32) @ W^T, W given as packed (N, K/2) bytes and scales (N, K/blocksize). The arithmetic, for
  // each (m, n): per block the table t[c] = kNF4Code[c] * scale (fp32; then rounded to bf16, nearest
  // even, when bf16_weights); 32 fp32 accumulators a[j] = fma(t[code of W[n, k]], x[m, k], a[j]) for
  // the k = j mod 32 in increasing order; then the fixed tree a[j] += a[j + 16], a[j] += a[j + 8],
  // a[j] += a[j + 4], a[j] += a[j + 2], y = a[0] + a[1].
  void (*gemv)(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
               int64_t blocksize, bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N);

  // fp16 bit patterns -> fp32 (exact); nullptr where the variant has no faster way than c10::Half.
  void (*half_to_float)(const uint16_t* src, float* dst, int64_t len);
};

// The variants; nullptr where the compiler or architecture cannot build one (non-x86).
const IsaKernels* avx512_kernels();
const IsaKernels* avx2_kernels();
const IsaKernels& scalar_kernels();

// The variant in use (resolved once; throws a ValueError-type c10 error naming FASTLLM_CPU_ISA
// when it asks for an unknown variant or one this CPU lacks). Defined in nf4_cpu.cpp.
const IsaKernels& kernels();

}  // namespace fastllm::cpu
