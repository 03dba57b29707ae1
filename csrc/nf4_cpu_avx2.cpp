// The AVX2 (+ FMA, F16C) variant of the CPU kernels: the portable loops of nf4_cpu_generic.h,
// vectorized by the compiler for that target (set by the pragma below whatever flags the build
// passes), and F16C for fp16 input. Used only when the CPU has all three.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")  // a literal: GCC does not expand macros here
#endif

#include <immintrin.h>

#include "nf4_cpu_generic.h"

namespace fastllm::cpu {
namespace {

void half_to_float(const uint16_t* src, float* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < len; ++i) dst[i] = _cvtsh_ss(src[i]);
}

constexpr IsaKernels kAvx2{"avx2",        &generic_block_absmax, &generic_quantize_block, &generic_lookup_f32,
                           &generic_lookup_u16, &generic_gemv,        &half_to_float};

}  // namespace

const IsaKernels* avx2_kernels() { return &kAvx2; }

}  // namespace fastllm::cpu

#ifdef __clang__
#pragma clang attribute pop
#endif

#else  // not x86-64 GCC/clang: no AVX2 variant

#include "nf4_cpu_isa.h"

namespace fastllm::cpu {
const IsaKernels* avx2_kernels() { return nullptr; }
}  // namespace fastllm::cpu

#endif
