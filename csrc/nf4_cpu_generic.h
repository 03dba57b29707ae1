// Portable C++ implementations of the IsaKernels (nf4_cpu_isa.h), written as plain loops the compiler
// vectorizes for whatever target the including translation unit has. The scalar variant is exactly
// these functions built for the baseline x86-64; the AVX2 variant is these functions built for
// AVX2 + FMA; the AVX-512 variant uses them for block tails.
//
// Everything here has internal linkage (an anonymous namespace) and calls no library template or
// inline function, so that no copy built for one target can replace another's at link time. The
// arithmetic is the specification in nf4_cpu_isa.h, operation for operation (fp contraction is off
// in every translation unit; the one fused multiply-add is the explicit __builtin_fmaf).
#pragma once

#ifndef FASTLLM_NF4_FORMAT_ONLY
#define FASTLLM_NF4_FORMAT_ONLY
#endif
#include "nf4.h"
#include "nf4_cpu_isa.h"

#include <cstdint>
#include <cstring>

namespace fastllm::cpu {
namespace {

// The 15 midpoints (c[i] + c[i + 1]) / 2 in fp32: a value's nearest code is the number of
// midpoints strictly below it, so a value exactly on a midpoint goes to the lower code.
// A 16th slot holds +inf so the table fills one AVX-512 register.
struct NF4Midpoints {
  float m[16];
};

constexpr NF4Midpoints make_midpoints() {
  NF4Midpoints mid{};
  for (int i = 0; i < 15; ++i) mid.m[i] = (kNF4Code[i] + kNF4Code[i + 1]) / 2.0f;
  mid.m[15] = __builtin_inff();
  return mid;
}

constexpr NF4Midpoints kMid = make_midpoints();

// Output features per GEMV tile: a tile of W (kGemvTileN rows, K / 2 bytes each) is streamed from
// memory once and stays in cache while every chunk of rows of x passes over it.
constexpr int64_t kGemvTileN = 16;

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

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// fp32 -> bf16 bits, round to nearest even (c10::BFloat16's rounding for finite values).
inline uint16_t bf16_bits_rne(float v) {
  const uint32_t u = float_bits(v);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// |x| as integer bits orders like the float for finite values, and bits >= 0x7F800000 mark Inf/NaN,
// so this loop is pure integer arithmetic and vectorizes.
[[maybe_unused]] float generic_block_absmax(const float* v, int64_t len, int64_t* nonfinite) {
  uint32_t mx = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t a = float_bits(v[i]) & 0x7FFFFFFFu;
    mx = a > mx ? a : mx;
    bad += a >= 0x7F800000u;
  }
  *nonfinite += bad;
  return bits_float(mx);
}

// The scale of a block: values are multiplied by inv (full blocks) or divided by safe (the tail).
struct BlockScale {
  float safe, inv;
};

inline BlockScale block_scale(float absmax) {
  const float safe = absmax < kMinScale ? kMinScale : absmax;  // std::max(absmax, kMinScale)
  return {safe, 1.0f / safe};
}

// The NF4 code of v: scale, clamp to [-1, 1], count the midpoints strictly below.
inline uint8_t nf4_code_of(float v, BlockScale s, bool full) {
  float x = full ? v * s.inv : v / s.safe;
  x = x < -1.0f ? -1.0f : x;  // max(x, -1), then min(x, 1), as _mm512_max_ps / _mm512_min_ps order them
  x = x > 1.0f ? 1.0f : x;
  uint8_t c = 0;
  for (int j = 0; j < 15; ++j) c += x > kMid.m[j];
  return c;
}

// Codes of v[0, len) packed into out[0, (len + 1) / 2); an odd tail is padded with code 7.
void quantize_range(const float* v, int64_t len, BlockScale s, bool full, uint8_t* out) {
  uint8_t codes[2];
  for (int64_t i = 0; i < len; i += 2) {
    codes[0] = nf4_code_of(v[i], s, full);
    codes[1] = i + 1 < len ? nf4_code_of(v[i + 1], s, full) : static_cast<uint8_t>(kNF4ZeroIndex);
    out[i / 2] = static_cast<uint8_t>((codes[0] << 4) | codes[1]);
  }
}

[[maybe_unused]] void generic_quantize_block(const float* v, int64_t len, float absmax, bool full, uint8_t* out) {
  quantize_range(v, len, block_scale(absmax), full, out);
}

template <typename T>
void lookup_range(const uint8_t* p, int64_t len, const T* table, T* out) {
  for (int64_t i = 0; i < len; i += 2) {
    const uint8_t byte = p[i / 2];
    out[i] = table[byte >> 4];
    if (i + 1 < len) out[i + 1] = table[byte & 0x0F];
  }
}

[[maybe_unused]] void generic_lookup_f32(const uint8_t* p, int64_t len, const float* table, float* out) {
  lookup_range(p, len, table, out);
}

[[maybe_unused]] void generic_lookup_u16(const uint8_t* p, int64_t len, const uint16_t* table, uint16_t* out) {
  lookup_range(p, len, table, out);
}

// The 16 weights of a block: code * scale in fp32, optionally rounded to bf16 (kept as fp32).
inline void block_table(float scale, bool bf16_weights, float* table) {
  for (int c = 0; c < 16; ++c) {
    const float t = kNF4Code[c] * scale;
    table[c] = bf16_weights ? bits_float(static_cast<uint32_t>(bf16_bits_rne(t)) << 16) : t;
  }
}

// The fixed reduction tree of the 32 GEMV accumulators (see nf4_cpu_isa.h).
inline float reduce32(float* a) {
  for (int j = 0; j < 16; ++j) a[j] += a[j + 16];
  for (int j = 0; j < 8; ++j) a[j] += a[j + 8];
  for (int j = 0; j < 4; ++j) a[j] += a[j + 4];
  for (int j = 0; j < 2; ++j) a[j] += a[j + 2];
  return a[0] + a[1];
}

// MT rows of y for output features [n0, n1): each group of 32 weights is decoded once and multiplied
// into all MT rows of x, accumulator j of a row taking the products of the k = j mod 32.
template <int MT>
void generic_gemv_rows(const float* x, int64_t ldx, int64_t K, const uint8_t* packed, const float* scales,
                       int64_t blocksize, bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = packed + n * (K / 2);
    const float* srow = scales + n * blocks_per_row;
    float acc[MT][32] = {};
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      float table[16];
      block_table(srow[b], bf16_weights, table);
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32) {
        float w[32];
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = wrow[k / 2 + j];
          w[2 * j] = table[byte >> 4];
          w[2 * j + 1] = table[byte & 0x0F];
        }
        for (int m = 0; m < MT; ++m) {
          const float* xr = x + m * ldx + k;
          for (int j = 0; j < 32; ++j) acc[m][j] = __builtin_fmaf(w[j], xr[j], acc[m][j]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = reduce32(acc[m]);
  }
}

using GemvRowsFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, int64_t, bool, int64_t,
                            int64_t, float*, int64_t);

// Output features [n0, n1) for all M rows of x: tile by tile of W, chunks of up to R rows of x
// (rows[r - 1] handles r rows), so W is read from memory once whatever M is.
template <int R>
void gemv_tiles(const GemvRowsFn (&rows)[R], const float* x, int64_t ldx, int64_t M, int64_t K,
                const uint8_t* packed, const float* scales, int64_t blocksize, bool bf16_weights, int64_t n0,
                int64_t n1, float* y, int64_t N) {
  for (int64_t t0 = n0; t0 < n1; t0 += kGemvTileN) {
    const int64_t t1 = min_i64(n1, t0 + kGemvTileN);
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int64_t mt = min_i64(R, M - m0);
      rows[mt - 1](x + m0 * ldx, ldx, K, packed, scales, blocksize, bf16_weights, t0, t1, y + m0 * N, N);
    }
  }
}

// Four rows per pass: 4 x 32 accumulators already fill the 16 AVX2 registers.
constexpr GemvRowsFn kGenericGemvRows[4] = {&generic_gemv_rows<1>, &generic_gemv_rows<2>, &generic_gemv_rows<3>,
                                            &generic_gemv_rows<4>};

[[maybe_unused]] void generic_gemv(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
                  int64_t blocksize, bool bf16_weights, int64_t n0, int64_t n1, float* y, int64_t N) {
  gemv_tiles(kGenericGemvRows, x, ldx, M, K, packed, scales, blocksize, bf16_weights, n0, n1, y, N);
}

}  // namespace
}  // namespace fastllm::cpu
