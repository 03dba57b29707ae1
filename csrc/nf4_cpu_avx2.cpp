// The AVX2 (+ FMA, F16C) variant of the CPU kernels: 8-lane compares for the nearest-code search,
// two 8-lane permutes + a blend (or two byte shuffles, for 16-bit outputs) per table lookup, 8-lane
// FMAs for the GEMV. Compiled for that target by the pragma below whatever flags the build passes;
// used only when the CPU has all three. Arithmetic: the specification in nf4_cpu_isa.h, bit for bit.
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

// 8 values at a time: scale, clamp, then the code = number of midpoints strictly below (15 compares,
// each adding -1 or 0); each pair of int32 codes (one 64-bit lane) becomes (even << 4) | odd.
void quantize_block(const float* v, int64_t len, float absmax, bool full, uint8_t* out) {
  const BlockScale s = block_scale(absmax);
  const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const __m256 scaled = full ? _mm256_mul_ps(x, _mm256_set1_ps(s.inv)) : _mm256_div_ps(x, _mm256_set1_ps(s.safe));
    const __m256 c = _mm256_min_ps(_mm256_max_ps(scaled, lo), hi);
    __m256i idx = _mm256_setzero_si256();
    for (int j = 0; j < 15; ++j)
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(c, _mm256_set1_ps(kMid.m[j]), _CMP_GT_OQ)));
    alignas(32) uint64_t pairs[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs),
                       _mm256_or_si256(_mm256_slli_epi64(idx, 4), _mm256_srli_epi64(idx, 32)));
    for (int j = 0; j < 4; ++j) out[i / 2 + j] = static_cast<uint8_t>(pairs[j]);
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

// A 16-entry fp32 table as two 8-lane halves; lookup = the permute of each half, blended on bit 3.
struct Table16 {
  __m256 lo, hi;
};

inline Table16 load_table(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }

// The 32 table values of one group of 16 packed bytes, elements 8q .. 8q + 7 in w[q].
inline void lookup32(const uint8_t* p, const Table16& t, __m256 (&w)[4]) {
  const __m256i idx8 = unpack32_u8(p);
  const __m128i halves[2] = {_mm256_castsi256_si128(idx8), _mm256_extracti128_si256(idx8, 1)};
  for (int q = 0; q < 4; ++q) {
    const __m128i part = (q & 1) ? _mm_srli_si128(halves[q >> 1], 8) : halves[q >> 1];
    const __m256i idx = _mm256_cvtepu8_epi32(part);
    const __m256 from_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
    w[q] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), from_hi);
  }
}

void lookup_f32(const uint8_t* p, int64_t len, const float* table, float* out) {
  const Table16 t = load_table(table);
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256 w[4];
    lookup32(p + i / 2, t, w);
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + i + 8 * q, w[q]);
  }
  lookup_range(p + i / 2, len - i, table, out + i);
}

void lookup_u16(const uint8_t* p, int64_t len, const uint16_t* table, uint16_t* out) {
  // The low and high bytes of the 16 entries as two byte tables (in both 128-bit lanes): one in-lane
  // byte shuffle each looks up 32 elements, and interleaving them gives the 16-bit values.
  alignas(16) uint8_t low[16], high[16];
  for (int c = 0; c < 16; ++c) {
    low[c] = static_cast<uint8_t>(table[c] & 0xFF);
    high[c] = static_cast<uint8_t>(table[c] >> 8);
  }
  const __m256i tl = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(low)));
  const __m256i th = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(high)));
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m256i idx = unpack32_u8(p + i / 2);
    const __m256i l = _mm256_shuffle_epi8(tl, idx), h = _mm256_shuffle_epi8(th, idx);
    // Per 128-bit lane: unpacklo holds elements 0..7 (lane 0) / 16..23 (lane 1), unpackhi 8..15 / 24..31.
    const __m256i a = _mm256_unpacklo_epi8(l, h), b = _mm256_unpackhi_epi8(l, h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16), _mm256_permute2x128_si256(a, b, 0x31));
  }
  lookup_range(p + i / 2, len - i, table, out + i);
}

// MT rows of y for output features [n0, n1). acc[m][q] holds the specification's a[8q .. 8q + 7].
template <int MT>
void gemv_rows(const float* x, int64_t ldx, int64_t K, const uint8_t* packed, const float* scales, int64_t blocksize,
               bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* srow = scales + n * blocks_per_row;
    __m256 acc[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      float tab[16];
      block_table(srow[b], bf16_weights, tab);
      const Table16 t = load_table(tab);
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32) {
        __m256 w[4];
        lookup32(wrow + k / 2, t, w);
        for (int m = 0; m < MT; ++m)
          for (int q = 0; q < 4; ++q)
            acc[m][q] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(x + m * ldx + k + 8 * q), acc[m][q]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      // The specification's tree: lanes j + 16, j + 8, j + 4, j + 2, then the last pair.
      const __m256 s8 = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][2]), _mm256_add_ps(acc[m][1], acc[m][3]));
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      y[m * N + n] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
  }
}

// Three rows per pass: 12 accumulators and the 4 weight vectors fill the 16 registers.
constexpr GemvRowsFn kGemvRows[3] = {&gemv_rows<1>, &gemv_rows<2>, &gemv_rows<3>};

void gemv(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
          int64_t blocksize, bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N) {
  gemv_tiles(kGemvRows, x, ldx, M, K, packed, scales, blocksize, bf16_weights, n0, n1, y, N);
}

void half_to_float(const uint16_t* src, float* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < len; ++i) dst[i] = _cvtsh_ss(src[i]);
}

constexpr IsaKernels kAvx2{"avx2", &generic_block_absmax, &quantize_block, &lookup_f32, &lookup_u16, &gemv,
                           &half_to_float};

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
