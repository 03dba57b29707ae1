// The AVX-512 (F + BW) variant of the CPU kernels: permutes of a 16-entry table in one register
// for the nearest-code search and the nibble lookups, 16-lane FMAs for the GEMV. Compiled for that
// target by the pragma below whatever flags the build passes; used only when the CPU has it.
// Arithmetic: the specification in nf4_cpu_isa.h, bit for bit (tests/test_isa.py).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx2,fma,f16c")  // a literal: GCC does not expand macros here
#endif

// GCC 12 reports the intrinsics' own _mm512_undefined_* placeholders as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "nf4_cpu_generic.h"

namespace fastllm::cpu {
namespace {

// 16 values at a time: a branchless binary search over the sorted midpoints (4 steps of permute +
// compare) counts the midpoints below each scaled, clamped value; each pair of int32 codes (one
// 64-bit lane) becomes the byte (even << 4) | odd. The remainder goes through the generic code.
void quantize_block(const float* v, int64_t len, float absmax, bool full, uint8_t* out) {
  const BlockScale s = block_scale(absmax);
  const __m512 mid = _mm512_loadu_ps(kMid.m);  // lane 15 holds +inf, never looked up
  const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __m512 scaled = full ? _mm512_mul_ps(x, _mm512_set1_ps(s.inv)) : _mm512_div_ps(x, _mm512_set1_ps(s.safe));
    const __m512 c = _mm512_min_ps(_mm512_max_ps(scaled, lo), hi);
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step > 0; step >>= 1) {
      const __m512i cand = _mm512_add_epi32(idx, _mm512_set1_epi32(step));
      const __m512 m = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, _mm512_set1_epi32(1)), mid);
      idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(c, m, _CMP_GT_OQ), cand);
    }
    const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(idx, 4), _mm512_srli_epi64(idx, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), _mm512_cvtepi64_epi8(pairs));
  }
  quantize_range(v + i, len - i, s, full, out + i / 2);
}

// 16 packed bytes -> their 32 code indices in element order (high nibble first), as bytes.
inline __m256i unpack32_u8(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i lo = _mm_and_si128(bytes, mask);
  return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

// The same indices as two vectors of 16 int32 lanes (elements 0..15 and 16..31).
inline void unpack32(const uint8_t* p, __m512i& idx_lo, __m512i& idx_hi) {
  const __m256i idx = unpack32_u8(p);
  idx_lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx));
  idx_hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1));
}

void lookup_f32(const uint8_t* p, int64_t len, const float* table, float* out) {
  const __m512 t = _mm512_loadu_ps(table);
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m512i lo, hi;
    unpack32(p + i / 2, lo, hi);
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(lo, t));
    _mm512_storeu_ps(out + i + 16, _mm512_permutexvar_ps(hi, t));
  }
  lookup_range(p + i / 2, len - i, table, out + i);
}

void lookup_u16(const uint8_t* p, int64_t len, const uint16_t* table, uint16_t* out) {
  // The 16 table entries in the 16-bit lanes 0..15; one 16-bit permute looks up 32 elements.
  const __m512i t = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table)));
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512i idx = _mm512_cvtepu8_epi16(unpack32_u8(p + i / 2));
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(idx, t));
  }
  lookup_range(p + i / 2, len - i, table, out + i);
}

// MT rows of y for output features [n0, n1). Accumulator lanes: acc0[m] holds a[0..15] and acc1[m]
// a[16..31] of the specification, so each 32-weight step is two FMAs per row of x.
template <int MT>
void gemv_rows(const float* x, int64_t ldx, int64_t K, const uint8_t* packed, const float* scales, int64_t blocksize,
               bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* srow = scales + n * blocks_per_row;
    __m512 acc0[MT], acc1[MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      float tab[16];
      block_table(srow[b], bf16_weights, tab);
      const __m512 table = _mm512_loadu_ps(tab);
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32) {
        __m512i lo, hi;
        unpack32(wrow + k / 2, lo, hi);
        const __m512 w0 = _mm512_permutexvar_ps(lo, table);
        const __m512 w1 = _mm512_permutexvar_ps(hi, table);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const float* xr = x + m * ldx + k;
          acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[m]);
        }
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      // The specification's tree: lanes j + 16, j + 8, j + 4, j + 2, then the last pair.
      const __m512 s16 = _mm512_add_ps(acc0[m], acc1[m]);
      const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s16), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s16), 1)));
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      y[m * N + n] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
  }
}

// Eight rows per pass: 16 accumulators + the table and two weight vectors fit the 32 registers.
constexpr GemvRowsFn kGemvRows[8] = {&gemv_rows<1>, &gemv_rows<2>, &gemv_rows<3>, &gemv_rows<4>,
                                     &gemv_rows<5>, &gemv_rows<6>, &gemv_rows<7>, &gemv_rows<8>};

void gemv(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
          int64_t blocksize, bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N) {
  gemv_tiles(kGemvRows, x, ldx, M, K, packed, scales, blocksize, bf16_weights, n0, n1, y, N);
}

void half_to_float(const uint16_t* src, float* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < len; ++i) dst[i] = _cvtsh_ss(src[i]);
}

constexpr IsaKernels kAvx512{"avx512", &generic_block_absmax, &quantize_block, &lookup_f32,
                             &lookup_u16, &gemv,                 &half_to_float};

}  // namespace

const IsaKernels* avx512_kernels() { return &kAvx512; }

}  // namespace fastllm::cpu

#ifdef __clang__
#pragma clang attribute pop
#endif

#else  // not x86-64 GCC/clang: no AVX-512 variant

#include "nf4_cpu_isa.h"

namespace fastllm::cpu {
const IsaKernels* avx512_kernels() { return nullptr; }
}  // namespace fastllm::cpu

#endif
