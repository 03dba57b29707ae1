// CPU kernels of fastllm._C: NF4 quantize (with double quantization), scale decoding,
// dequantize and the small-M dequantize-GEMV.
//
// Quantize and dequantize reproduce fastllm/reference.py (and so bitsandbytes) bit for
// bit. setup.py builds this file with -ffp-contract=off so that no multiply-add is fused
// where the reference rounds twice. Plain loops are written so that the compiler can
// vectorize them (widening, integer max for absmax); the nearest-code search and the table
// lookups use AVX-512 (permutes, and bf16 dot products for bf16 GEMV input) when the
// compiler targets it (setup.py passes -march=native), with scalar fallbacks otherwise.
// All loops are split over blocks or output features with at::parallel_for.
// The dequantize output, when large, is allocated on huge pages (large_alloc.h).
#include "large_alloc.h"
#include "nf4.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/to.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FASTLLM_AVX512 1
#endif

// Dispatch over the three floating dtypes fastllm supports (fp32, fp16, bf16).
#define FASTLLM_DISPATCH_FLOAT(TYPE, NAME, ...)                                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastllm::cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

// The 15 midpoints (c[i] + c[i + 1]) / 2 in fp32: a value's nearest code is the number of
// midpoints strictly below it, so a value exactly on a midpoint goes to the lower code.
// A 16th slot holds +inf so the table fills one AVX-512 register.
struct NF4Midpoints {
  float m[16];
};

constexpr NF4Midpoints make_midpoints() {
  NF4Midpoints mid{};
  for (int i = 0; i < 15; ++i) mid.m[i] = (kNF4Code[i] + kNF4Code[i + 1]) / 2.0f;
  mid.m[15] = std::numeric_limits<float>::infinity();
  return mid;
}

constexpr NF4Midpoints kMid = make_midpoints();

inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// fp32 -> bf16 bits, round to nearest even (c10::BFloat16's rounding for finite values).
inline uint16_t bf16_bits_rne(float v) {
  const uint32_t u = float_bits(v);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Widen `len` values of type T to fp32 (exact for every input dtype).
template <typename T>
void load_fp32(const T* src, float* dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
void load_fp32<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t len) {
  // bf16 is the high half of an fp32: a shift, which the compiler vectorizes.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < len; ++i) dst[i] = bits_float(static_cast<uint32_t>(s[i]) << 16);
}

#ifdef FASTLLM_AVX512
template <>
void load_fp32<c10::Half>(const c10::Half* src, float* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
  for (; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif

// Narrow fp32 to the output dtype with round-to-nearest-even (as Tensor.to does).
template <typename T>
void store_from_fp32(const float* src, T* dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(src[i]);
}

template <>
void store_from_fp32<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t len) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < len; ++i) d[i] = bf16_bits_rne(src[i]);
}

// ---------------------------------------------------------------------------------------
// Quantize: 4-bit pass
// ---------------------------------------------------------------------------------------

// One block: absmax and non-finite count. |x| as integer bits orders like the float for
// finite values, and bits >= 0x7F800000 mark Inf/NaN, so this loop is pure integer
// arithmetic and vectorizes.
inline float block_absmax(const float* v, int64_t len, int64_t& nonfinite) {
  uint32_t mx = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t a = float_bits(v[i]) & 0x7FFFFFFFu;
    mx = std::max(mx, a);
    bad += a >= 0x7F800000u;
  }
  nonfinite += bad;
  return bits_float(mx);
}

// Nearest NF4 code of each value after scaling: full blocks multiply by the fp32
// reciprocal of absmax, the short tail block divides (bitsandbytes does both); clamp to
// [-1, 1]; code = number of midpoints strictly below the value. Then two codes per byte,
// first in the high nibble, an odd tail padded with code 7.
inline void quantize_block(const float* v, int64_t len, float absmax, bool full, uint8_t* codes, uint8_t* out) {
  const float safe = std::max(absmax, kMinScale);
  const float inv = 1.0f / safe;
  int64_t i = 0;
#ifdef FASTLLM_AVX512
  // 16 values at a time: a branchless binary search over the sorted midpoints (4 steps of
  // permute + compare) finds the count of midpoints below each value; then each pair of
  // int32 codes (one 64-bit lane) becomes the byte (even << 4) | odd.
  const __m512 mid = _mm512_loadu_ps(kMid.m);  // lane 15 holds +inf, never looked up
  const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  for (; i + 16 <= len; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __m512 scaled = full ? _mm512_mul_ps(x, _mm512_set1_ps(inv)) : _mm512_div_ps(x, _mm512_set1_ps(safe));
    const __m512 s = _mm512_min_ps(_mm512_max_ps(scaled, lo), hi);
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step > 0; step >>= 1) {
      const __m512i cand = _mm512_add_epi32(idx, _mm512_set1_epi32(step));
      const __m512 m = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, _mm512_set1_epi32(1)), mid);
      idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(s, m, _CMP_GT_OQ), cand);
    }
    const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(idx, 4), _mm512_srli_epi64(idx, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), _mm512_cvtepi64_epi8(pairs));
  }
#endif
  // Scalar tail (the whole block without AVX-512): count midpoints, then pack.
  const int64_t packed_until = i;
  for (; i < len; ++i) {
    const float s = std::min(std::max(full ? v[i] * inv : v[i] / safe, -1.0f), 1.0f);
    uint8_t c = 0;
    for (int j = 0; j < 15; ++j) c += s > kMid.m[j];
    codes[i] = c;
  }
  if (len % 2) codes[len] = kNF4ZeroIndex;
  for (int64_t j = packed_until / 2; j < (len + 1) / 2; ++j)
    out[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
}

template <typename T>
int64_t quantize_4bit(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  std::atomic<int64_t> nonfinite{0};
  // ~64K elements per task: large enough to amortise the thread start-up.
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(blocksize);
    std::vector<uint8_t> codes(blocksize + 1);
    int64_t bad = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      load_fp32(x + start, buf.data(), len);
      const float amax = block_absmax(buf.data(), len, bad);
      absmax[b] = amax;
      quantize_block(buf.data(), len, amax, len == blocksize, codes.data(), packed + start / 2);
    }
    nonfinite += bad;
  });
  return nonfinite.load();
}

// ---------------------------------------------------------------------------------------
// Quantize: 8-bit pass of double quantization
// ---------------------------------------------------------------------------------------

// bitsandbytes' CPU 8-bit quantizer maps a value in [-1, 1] onto the uniform fp32 grid
// g_i = -1 + 2 i / 65535 and looks the code up: lut[i] = number of code-map midpoints
// strictly below g_i. Both sequences are sorted, so one merge walk builds the table.
std::vector<uint8_t> build_lut(const float* code_map) {
  std::array<float, 255> mid{};
  for (int j = 0; j < 255; ++j) mid[j] = 0.5f * (code_map[j] + code_map[j + 1]);
  std::vector<uint8_t> lut(kLutSize);
  int below = 0;
  for (int i = 0; i < kLutSize; ++i) {
    const float g = static_cast<float>(i) * 2.0f / static_cast<float>(kLutSize - 1) - 1.0f;
    while (below < 255 && mid[below] < g) ++below;
    lut[i] = static_cast<uint8_t>(below);
  }
  return lut;
}

// codes / nested_absmax of (absmax - offset) in blocks of 256: scale by the fp32
// reciprocal of the block absmax, clamp, grid index round(((s + 1) / 2) * 65535) with each
// step rounded in fp32 (no FMA), table lookup; an all-zero block gets codes 0.
void quantize_nested(const float* absmax, int64_t n, float offset, const float* code_map, uint8_t* codes,
                     float* nested_absmax) {
  const std::vector<uint8_t> lut = build_lut(code_map);
  const int64_t nblocks = (n + kNestedBlocksize - 1) / kNestedBlocksize;
  at::parallel_for(0, nblocks, 64, [&](int64_t b0, int64_t b1) {
    float centred[kNestedBlocksize];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kNestedBlocksize;
      const int64_t len = std::min<int64_t>(kNestedBlocksize, n - start);
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        centred[i] = absmax[start + i] - offset;
        amax = std::max(amax, std::abs(centred[i]));
      }
      nested_absmax[b] = amax;
      const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        const float s = std::min(std::max(centred[i] * inv, -1.0f), 1.0f);
        const float grid = (s + 1.0f) * 0.5f * static_cast<float>(kLutSize - 1) + 0.5f;
        codes[start + i] = amax > 0.0f ? lut[static_cast<int64_t>(grid)] : 0;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Dequantize
// ---------------------------------------------------------------------------------------

#ifdef FASTLLM_AVX512
// 16 packed bytes -> the 32 code indices in element order (high nibble first), as two
// vectors of 16 int32 lanes, ready for a 16-entry permute lookup.
inline void unpack32(const uint8_t* p, __m512i& idx_lo, __m512i& idx_hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i lo = _mm_and_si128(bytes, mask);
  idx_lo = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));  // elements 0..15
  idx_hi = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));  // elements 16..31
}

inline void store16(float* dst, __m512i /*unused*/, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(c10::BFloat16* dst, __m512i bits, __m512 /*v*/) {
  // Round to nearest even on the integer bits, then keep the high halves.
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}

inline void store16(c10::Half* dst, __m512i /*bits*/, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// out[i] = (T) (code[nibble_i] * scale[block]) for the elements of one block.
template <typename T>
void dequantize_block(const uint8_t* p, int64_t len, float scale, T* out) {
  int64_t i = 0;
#ifdef FASTLLM_AVX512
  // Scale the 16-entry table once per block (code * scale, one rounding, as the
  // reference does); each value is then a single permute of the scaled table.
  const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(kNF4Code), _mm512_set1_ps(scale));
  for (; i + 32 <= len; i += 32) {
    __m512i lo, hi;
    unpack32(p + i / 2, lo, hi);
    const __m512 v0 = _mm512_permutexvar_ps(lo, table);
    const __m512 v1 = _mm512_permutexvar_ps(hi, table);
    store16(out + i, _mm512_castps_si512(v0), v0);
    store16(out + i + 16, _mm512_castps_si512(v1), v1);
  }
#endif
  float tmp[2];
  for (; i < len; i += 2) {
    const uint8_t byte = p[i / 2];
    tmp[0] = kNF4Code[byte >> 4] * scale;
    tmp[1] = kNF4Code[byte & 0x0F] * scale;
    store_from_fp32(tmp, out + i, std::min<int64_t>(2, len - i));
  }
}

template <typename T>
void dequantize_all(const uint8_t* packed, const float* scales, int64_t n, int64_t blocksize, T* out) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      dequantize_block(packed + start / 2, std::min(blocksize, n - start), scales[b], out + start);
    }
  });
}

// ---------------------------------------------------------------------------------------
// GEMV: y[m, n] = sum_k x[m, k] * W[n, k] for small M
// ---------------------------------------------------------------------------------------

// MT rows of y (x with row stride ldx) for output features [n0, n1). Each packed byte of W
// is read once and dequantized in registers (the per-block scaled table trick of
// dequantize_block), then multiplied into all MT rows of x with fp32 accumulation.
template <int MT>
void gemv_rows(const float* x, int64_t ldx, int64_t K, const uint8_t* packed, const float* scales, int64_t blocksize,
               int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* srow = scales + n * blocks_per_row;
#ifdef FASTLLM_AVX512
    // Two accumulators per row of x halve the FMA dependency chain when MT is small;
    // with more rows the rows themselves give enough independent chains.
    constexpr int NA = MT <= 4 ? 2 : 1;
    __m512 acc[NA][MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[0][m] = acc[NA - 1][m] = _mm512_setzero_ps();
    const __m512 code = _mm512_loadu_ps(kNF4Code);
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(srow[b]));
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32) {
        __m512i lo, hi;
        unpack32(wrow + k / 2, lo, hi);
        const __m512 w0 = _mm512_permutexvar_ps(lo, table);
        const __m512 w1 = _mm512_permutexvar_ps(hi, table);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const float* xr = x + m * ldx + k;
          acc[0][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[0][m]);
          acc[NA - 1][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[NA - 1][m]);
        }
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[0][m];
      if (NA == 2) sum = _mm512_add_ps(sum, acc[NA - 1][m]);
      y[m * N + n] = _mm512_reduce_add_ps(sum);
    }
#else
    float acc[MT] = {};
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      float table[16];
      for (int c = 0; c < 16; ++c) table[c] = kNF4Code[c] * srow[b];
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 2) {
        const uint8_t byte = wrow[k / 2];
        const float w0 = table[byte >> 4];
        const float w1 = table[byte & 0x0F];
        for (int m = 0; m < MT; ++m) acc[m] += w0 * x[m * ldx + k] + w1 * x[m * ldx + k + 1];
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = acc[m];
#endif
  }
}

#if defined(FASTLLM_AVX512) && defined(__AVX512BF16__)
#define FASTLLM_AVX512_BF16 1
// The bf16 version for bf16 x (the dense path's semantics: W dequantized to bf16, then a
// bf16 matmul with fp32 accumulation). Each block's 16-entry table code * scale is rounded
// to bf16 once; 16 packed bytes become 32 bf16 weights with one 16-bit permute, and one
// dot-product instruction (pairs of bf16 products summed into fp32 lanes) per row of x
// replaces two fp32 FMAs.
template <int MT>
void gemv_rows_bf16(const c10::BFloat16* x, int64_t ldx, int64_t K, const uint8_t* packed, const float* scales,
                    int64_t blocksize, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t blocks_per_row = K / blocksize;
  constexpr int NA = MT <= 4 ? 2 : 1;  // as in gemv_rows: two chains per row when MT is small
  const __m512 code = _mm512_loadu_ps(kNF4Code);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* srow = scales + n * blocks_per_row;
    __m512 acc[NA][MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[0][m] = acc[NA - 1][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      // Scaled table in fp32, rounded to bf16 (nearest even) into the 16-bit lanes 0..15.
      const __m512i bits = _mm512_castps_si512(_mm512_mul_ps(code, _mm512_set1_ps(srow[b])));
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i rounded =
          _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      const __m512i table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(rounded));
      // 32 weights into the accumulator set `a`: 16 bytes -> 32 nibble indices in element
      // order (high nibble first) -> 32 bf16 by one permute -> one dot product per row.
      auto step = [&](int64_t k, __m512(&a)[MT]) __attribute__((always_inline)) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k / 2));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        const __m128i lo = _mm_and_si128(bytes, mask);
        const __m256i idx8 = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx8), table);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_loadu_si512(x + m * ldx + k), w);
      };
      const int64_t kend = (b + 1) * blocksize;
      int64_t k = b * blocksize;
      for (; k + 64 <= kend; k += 64) {
        step(k, acc[0]);
        step(k + 32, acc[NA - 1]);
      }
      if (k < kend) step(k, acc[0]);
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[0][m];
      if (NA == 2) sum = _mm512_add_ps(sum, acc[NA - 1][m]);
      y[m * N + n] = _mm512_reduce_add_ps(sum);
    }
  }
}
#endif

template <typename XT>
using GemvFn = void (*)(const XT*, int64_t, int64_t, const uint8_t*, const float*, int64_t, int64_t, int64_t, float*,
                        int64_t);

// The row kernels for MT = 1 .. 8 rows of x, indexed by MT - 1 (more rows spill registers).
constexpr int kGemvMaxRows = 8;
// Output features per tile: a tile of W (kGemvTileN rows, K / 2 bytes each) is streamed from
// memory once and stays in cache while every chunk of 8 rows of x passes over it.
constexpr int64_t kGemvTileN = 16;

template <int... Ms>
constexpr std::array<GemvFn<float>, sizeof...(Ms)> gemv_table(std::integer_sequence<int, Ms...>) {
  return {&gemv_rows<Ms + 1>...};
}
constexpr auto kGemvFns = gemv_table(std::make_integer_sequence<int, kGemvMaxRows>{});

#ifdef FASTLLM_AVX512_BF16
template <int... Ms>
constexpr std::array<GemvFn<c10::BFloat16>, sizeof...(Ms)> gemv_table_bf16(std::integer_sequence<int, Ms...>) {
  return {&gemv_rows_bf16<Ms + 1>...};
}
constexpr auto kGemvFnsBF16 = gemv_table_bf16(std::make_integer_sequence<int, kGemvMaxRows>{});
#endif

// y (M, N) fp32 from x (M, K) held with row stride ldx. Split over output features; for each
// tile of W, every chunk of up to 8 rows of x makes one pass over it (from cache after the
// first), so W is read from memory once whatever M is.
template <typename XT, size_t R>
void gemv_driver(const std::array<GemvFn<XT>, R>& fns, const XT* x, int64_t ldx, int64_t M, int64_t K,
                 const uint8_t* packed, const float* scales, int64_t blocksize, int64_t N, float* y) {
  const int64_t grain = std::max<int64_t>(kGemvTileN, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += kGemvTileN) {
      const int64_t t1 = std::min(n1, t0 + kGemvTileN);
      for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxRows) {
        const int64_t mt = std::min<int64_t>(kGemvMaxRows, M - m0);
        fns[mt - 1](x + m0 * ldx, ldx, K, packed, scales, blocksize, t0, t1, y + m0 * N, N);
      }
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points (inputs are checked in bindings.cpp)
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight, int64_t blocksize,
                                                                        bool double_quant,
                                                                        const at::Tensor& code_map) {
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const auto f32 = w.options().dtype(at::kFloat);
  const auto u8 = w.options().dtype(at::kByte);
  at::Tensor packed = at::empty({(n + 1) / 2}, u8);
  at::Tensor absmax = at::empty({nblocks}, f32);
  int64_t nonfinite = 0;
  FASTLLM_DISPATCH_FLOAT(w.scalar_type(), "fastllm_quantize_nf4", [&] {
    nonfinite = quantize_4bit(w.const_data_ptr<scalar_t>(), n, blocksize, packed.mutable_data_ptr<uint8_t>(),
                              absmax.mutable_data_ptr<float>());
  });
  TORCH_CHECK_VALUE(nonfinite == 0, "weight has ", nonfinite,
                    " non-finite values (NaN or Inf); refusing to quantize");
  if (!double_quant) return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32)};
  // torch's own mean, so the offset is bit-identical to absmax.mean() in Python.
  at::Tensor offset = at::mean(absmax);
  at::Tensor codes = at::empty({nblocks}, u8);
  at::Tensor nested = at::empty({(nblocks + kNestedBlocksize - 1) / kNestedBlocksize}, f32);
  const at::Tensor cmap = code_map.contiguous();
  quantize_nested(absmax.const_data_ptr<float>(), nblocks, offset.item<float>(), cmap.const_data_ptr<float>(),
                  codes.mutable_data_ptr<uint8_t>(), nested.mutable_data_ptr<float>());
  return {packed, codes, nested, offset};
}

at::Tensor decode_scales(const at::Tensor& codes, const at::Tensor& nested_absmax, const at::Tensor& offset,
                         const at::Tensor& code_map) {
  const at::Tensor q = codes.contiguous();
  const at::Tensor nested = nested_absmax.contiguous();
  const at::Tensor cmap = code_map.contiguous();
  const int64_t n = q.numel();
  at::Tensor scales = at::empty({n}, q.options().dtype(at::kFloat));
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const float* np = nested.const_data_ptr<float>();
  const float* cp = cmap.const_data_ptr<float>();
  const float off = offset.item<float>();
  float* out = scales.mutable_data_ptr<float>();
  // code_map[q] * nested_absmax[block] + offset: two fp32 roundings, as the reference.
  // One thread decodes ~2 scales per ns, so a 4096 x 4096 weight's 256K scales take ~0.1 ms:
  // below 1M scales a second thread saves less than a parallel region can cost (on a busy
  // machine, waiting for a descheduled worker costs whole scheduler ticks).
  constexpr int64_t grain = int64_t{1} << 20;
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = cp[qp[i]] * np[i / kNestedBlocksize] + off;
  });
  return scales;
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype) {
  const at::Tensor p = packed.contiguous();
  const at::Tensor s = scales.contiguous();
  // The kernel is cheap next to faulting in a fresh output: put large ones on huge pages.
  at::Tensor out = empty_large({numel}, dtype);
  FASTLLM_DISPATCH_FLOAT(dtype, "fastllm_dequantize_nf4", [&] {
    dequantize_all(p.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), numel, blocksize,
                   out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize,
                    int64_t N) {
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const at::Tensor p = packed.contiguous();
  const at::Tensor s = scales.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  // x is copied with rows padded by 64 bytes: rows K * itemsize apart (a multiple of 4 KiB
  // for the usual K) would all map to the same L1 cache sets and evict each other.
#ifdef FASTLLM_AVX512_BF16
  if (x.scalar_type() == at::kBFloat16) {
    const int64_t ldx = K + 32;
    at::Tensor xb = at::empty({M, ldx}, x.options());
    xb.narrow(1, 0, K).copy_(x);
    gemv_driver(kGemvFnsBF16, xb.const_data_ptr<c10::BFloat16>(), ldx, M, K, p.const_data_ptr<uint8_t>(),
                s.const_data_ptr<float>(), blocksize, N, y.mutable_data_ptr<float>());
    return y.to(at::kBFloat16);
  }
#endif
  const int64_t ldx = K + 16;
  at::Tensor xf = at::empty({M, ldx}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, K).copy_(x);
  gemv_driver(kGemvFns, xf.const_data_ptr<float>(), ldx, M, K, p.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(),
              blocksize, N, y.mutable_data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace fastllm::cpu
