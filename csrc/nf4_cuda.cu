// CUDA kernels of fastllm._C: NF4 quantize (with double quantization), scale decoding,
// dequantize and the small-M dequantize-GEMV. Raw pointers and a cudaStream_t only (no
// torch header): bindings.cpp allocates the tensors and launches on torch's stream.
//
// Quantize / decode / dequantize reproduce fastllm/reference.py bit for bit: every fp32
// operation the reference rounds separately is written with an explicit round-to-nearest
// intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, ...), which nvcc never fuses into an FMA
// nor approximates, whatever the compile flags.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "nf4.h"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 256;  // threads per CUDA block in every kernel
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The NF4 table in shared memory (indexed by data-dependent nibbles, which would
// serialise on the constant cache).
__device__ __forceinline__ void load_code_table(float* code) {
  constexpr float kCode[16] = FASTLLM_NF4_CODE_VALUES;
  if (threadIdx.x < 16) code[threadIdx.x] = kCode[threadIdx.x];
  __syncthreads();
}

__device__ __forceinline__ unsigned warp_max(unsigned v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ unsigned warp_sum(unsigned v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------
// 4-bit quantize: one warp per quantization block
// ---------------------------------------------------------------------------------------

// Nearest code of a scaled value: clamp to [-1, 1], count the midpoints strictly below.
__device__ __forceinline__ unsigned nearest_code(float s, const float* mid) {
  s = fminf(fmaxf(s, -1.0f), 1.0f);
  unsigned c = 0;
#pragma unroll
  for (int j = 0; j < 15; ++j) c += s > mid[j];
  return c;
}

template <typename T>
__global__ void quantize_nf4_kernel(const T* __restrict__ x, int64_t n, int blocksize, uint8_t* __restrict__ packed,
                                    float* __restrict__ absmax, unsigned long long* nonfinite) {
  constexpr float kCode[16] = FASTLLM_NF4_CODE_VALUES;
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (block >= nblocks) return;  // whole warps exit together: no later __syncthreads
  const int64_t start = block * blocksize;
  const int len = static_cast<int>(min(static_cast<int64_t>(blocksize), n - start));

  // Pass 1: absmax as the max of |x| bit patterns (ordered like the floats when finite);
  // patterns >= 0x7F800000 are Inf/NaN and are counted.
  unsigned mx = 0, bad = 0;
  for (int i = lane; i < len; i += 32) {
    const unsigned a = __float_as_uint(to_float(x[start + i])) & 0x7FFFFFFFu;
    mx = max(mx, a);
    bad += a >= 0x7F800000u;
  }
  mx = warp_max(mx);
  bad = warp_sum(bad);
  const float amax = __uint_as_float(mx);
  if (lane == 0) {
    absmax[block] = amax;
    if (bad) atomicAdd(nonfinite, static_cast<unsigned long long>(bad));
  }

  // Pass 2: full blocks multiply by the fp32 reciprocal of absmax, a short tail block
  // divides (as bitsandbytes does); each lane packs pairs, the first code in the high
  // nibble, an odd tail padded with code 7.
  float mid[15];
#pragma unroll
  for (int j = 0; j < 15; ++j) mid[j] = __fmul_rn(__fadd_rn(kCode[j], kCode[j + 1]), 0.5f);
  const float safe = fmaxf(amax, kMinScale);
  const float inv = __frcp_rn(safe);
  const bool full = len == blocksize;
  for (int j = lane; j < (len + 1) / 2; j += 32) {
    unsigned c[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * j + h;
      if (i < len) {
        const float v = to_float(x[start + i]);
        c[h] = nearest_code(full ? __fmul_rn(v, inv) : __fdiv_rn(v, safe), mid);
      } else {
        c[h] = kNF4ZeroIndex;
      }
    }
    packed[start / 2 + j] = static_cast<uint8_t>((c[0] << 4) | c[1]);
  }
}

// ---------------------------------------------------------------------------------------
// 8-bit quantize of (absmax - offset): one CUDA block of 256 threads per 256 values
// ---------------------------------------------------------------------------------------

// Midpoint j of the sorted 256-entry map (in shared memory), as the reference computes it.
__device__ __forceinline__ float map_midpoint(const float* map, int j) {
  return __fmul_rn(0.5f, __fadd_rn(map[j], map[j + 1]));
}

__global__ void quantize_nested_kernel(const float* __restrict__ absmax, int64_t n, const float* __restrict__ offset,
                                       const float* __restrict__ code_map, uint8_t* __restrict__ codes,
                                       float* __restrict__ nested_absmax) {
  __shared__ float map[256];
  __shared__ unsigned warp_mx[kWarps];
  map[threadIdx.x] = code_map[threadIdx.x];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kNestedBlocksize + threadIdx.x;
  const float v = i < n ? __fsub_rn(absmax[i], *offset) : 0.0f;

  // Block absmax: warp max of |v| bits, then across the 8 warps.
  unsigned mx = warp_max(__float_as_uint(v) & 0x7FFFFFFFu);
  if ((threadIdx.x & 31) == 0) warp_mx[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = max(mx, warp_mx[w]);
  const float amax = __uint_as_float(mx);
  if (threadIdx.x == 0) nested_absmax[blockIdx.x] = amax;
  if (i >= n) return;
  if (amax == 0.0f) {  // an all-zero block gets codes 0
    codes[i] = 0;
    return;
  }

  // Grid index round(((s + 1) / 2) * 65535) with every step rounded in fp32, then the code
  // of that grid point: the number of map midpoints strictly below it (a binary search
  // gives the same entry as bitsandbytes' lookup table).
  const float s = fminf(fmaxf(__fmul_rn(v, __frcp_rn(amax)), -1.0f), 1.0f);
  const float scaled = __fmul_rn(__fmul_rn(__fadd_rn(s, 1.0f), 0.5f), static_cast<float>(kLutSize - 1));
  const int g = static_cast<int>(__fadd_rn(scaled, 0.5f));
  const float point = __fsub_rn(__fdiv_rn(__fmul_rn(static_cast<float>(g), 2.0f), static_cast<float>(kLutSize - 1)),
                                1.0f);
  int lo = 0, hi = 255;
  while (lo < hi) {
    const int m = (lo + hi) / 2;
    if (map_midpoint(map, m) < point)
      lo = m + 1;
    else
      hi = m;
  }
  codes[i] = static_cast<uint8_t>(lo);
}

// ---------------------------------------------------------------------------------------
// Scales and dequantize: elementwise
// ---------------------------------------------------------------------------------------

__global__ void decode_scales_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ nested_absmax,
                                     const float* __restrict__ offset, const float* __restrict__ code_map, int64_t n,
                                     float* __restrict__ scales) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) scales[i] = __fadd_rn(__fmul_rn(code_map[codes[i]], nested_absmax[i / kNestedBlocksize]), *offset);
}

// One thread per packed byte: its two elements (same block, blocksize is even) are
// (T) (code[nibble] * scale), the product rounded once in fp32.
template <typename T>
__global__ void dequantize_nf4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales, int64_t n,
                                      int blocksize, T* __restrict__ out) {
  __shared__ float code[16];
  load_code_table(code);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t e = 2 * j;
  if (e >= n) return;
  const uint8_t byte = packed[j];
  const float scale = scales[e / blocksize];
  out[e] = from_float<T>(__fmul_rn(code[byte >> 4], scale));
  if (e + 1 < n) out[e + 1] = from_float<T>(__fmul_rn(code[byte & 0x0F], scale));
}

// ---------------------------------------------------------------------------------------
// GEMV: one warp per output feature n, MT rows of x at once
// ---------------------------------------------------------------------------------------

// Each lane reads 4 packed bytes as one 32-bit word (8 weights, never crossing a block since
// blocksize is a multiple of 32; rows start K / 2 bytes apart, a multiple of 16, and the
// caller passes a 4-byte-aligned `packed`), dequantizes them in registers and multiplies
// them into MT rows of x; the warp then sums its 32 partial dot products. For bf16 x each
// weight is rounded to bf16 first, as the CPU kernel and a dense bf16 matmul of the
// dequantized weight do.
// A dequantized weight (code * scale in fp32) as the GEMV multiplies it: rounded to bf16
// for bf16 x, kept in fp32 otherwise.
template <typename T>
__device__ __forceinline__ float as_weight(float w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(__float2bfloat16_rn(w));
  return w;
}

template <typename T, int MT>
__global__ void nf4_gemv_kernel(const T* __restrict__ x, int64_t K, const uint8_t* __restrict__ packed,
                                const float* __restrict__ scales, int blocksize, int64_t N, T* __restrict__ y) {
  __shared__ float code[16];
  load_code_table(code);
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;
  const uint32_t* wrow = reinterpret_cast<const uint32_t*>(packed + n * (K / 2));
  const float* srow = scales + n * (K / blocksize);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  for (int64_t k = 8 * lane; k < K; k += 8 * 32) {
    const uint32_t word = wrow[k / 8];
    const float scale = srow[k / blocksize];
    float w[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (word >> (8 * b)) & 0xFFu;  // little endian: byte b holds elements 2b, 2b + 1
      w[2 * b] = as_weight<T>(__fmul_rn(code[byte >> 4], scale));
      w[2 * b + 1] = as_weight<T>(__fmul_rn(code[byte & 0x0Fu], scale));
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const T* xr = x + m * K + k;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[m] += w[e] * to_float(xr[e]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0) y[m * N + n] = from_float<T>(total);
  }
}

template <typename T, int MT>
void launch_gemv(const T* x, int64_t K, const uint8_t* packed, const float* scales, int blocksize, int64_t N, T* y,
                 cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((N + kWarps - 1) / kWarps);
  nf4_gemv_kernel<T, MT><<<grid, kThreads, 0, stream>>>(x, K, packed, scales, blocksize, N, y);
}

// Rows of x in chunks of up to 8 (one pass over W per chunk).
template <typename T>
cudaError_t gemv_typed(const T* x, int64_t M, int64_t K, const uint8_t* packed, const float* scales, int blocksize,
                       int64_t N, T* y, cudaStream_t stream) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const T* xm = x + m0 * K;
    T* ym = y + m0 * N;
    switch (static_cast<int>(M - m0 < 8 ? M - m0 : 8)) {
      case 1: launch_gemv<T, 1>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      case 2: launch_gemv<T, 2>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      case 3: launch_gemv<T, 3>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      case 4: launch_gemv<T, 4>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      case 5: launch_gemv<T, 5>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      case 6: launch_gemv<T, 6>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      case 7: launch_gemv<T, 7>(xm, K, packed, scales, blocksize, N, ym, stream); break;
      default: launch_gemv<T, 8>(xm, K, packed, scales, blocksize, N, ym, stream); break;
    }
  }
  return cudaGetLastError();
}

unsigned grid_for(int64_t items, int per_block) { return static_cast<unsigned>((items + per_block - 1) / per_block); }

}  // namespace

cudaError_t quantize_nf4(const void* x, DType x_dtype, int64_t n, int blocksize, uint8_t* packed, float* absmax,
                         unsigned long long* nonfinite, cudaStream_t stream) {
  const unsigned grid = grid_for((n + blocksize - 1) / blocksize, kWarps);
  switch (x_dtype) {
    case DType::kFloat32:
      quantize_nf4_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), n, blocksize, packed, absmax,
                                                         nonfinite);
      break;
    case DType::kFloat16:
      quantize_nf4_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), n, blocksize, packed,
                                                         absmax, nonfinite);
      break;
    case DType::kBFloat16:
      quantize_nf4_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), n, blocksize, packed,
                                                         absmax, nonfinite);
      break;
  }
  return cudaGetLastError();
}

cudaError_t quantize_nested(const float* absmax, int64_t n, const float* offset, const float* code_map,
                            uint8_t* codes, float* nested_absmax, cudaStream_t stream) {
  static_assert(kThreads == kNestedBlocksize, "one thread per value of a nested block");
  quantize_nested_kernel<<<grid_for(n, kNestedBlocksize), kThreads, 0, stream>>>(absmax, n, offset, code_map, codes,
                                                                                 nested_absmax);
  return cudaGetLastError();
}

cudaError_t decode_scales(const uint8_t* codes, const float* nested_absmax, const float* offset,
                          const float* code_map, int64_t n, float* scales, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  decode_scales_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(codes, nested_absmax, offset, code_map, n,
                                                                       scales);
  return cudaGetLastError();
}

cudaError_t dequantize_nf4(const uint8_t* packed, const float* scales, int64_t n, int blocksize, void* out,
                           DType out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = grid_for((n + 1) / 2, kThreads);
  switch (out_dtype) {
    case DType::kFloat32:
      dequantize_nf4_kernel<<<grid, kThreads, 0, stream>>>(packed, scales, n, blocksize, static_cast<float*>(out));
      break;
    case DType::kFloat16:
      dequantize_nf4_kernel<<<grid, kThreads, 0, stream>>>(packed, scales, n, blocksize, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      dequantize_nf4_kernel<<<grid, kThreads, 0, stream>>>(packed, scales, n, blocksize,
                                                           static_cast<__nv_bfloat16*>(out));
      break;
  }
  return cudaGetLastError();
}

cudaError_t nf4_gemv(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
                     int blocksize, int64_t N, void* y, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return gemv_typed(static_cast<const float*>(x), M, K, packed, scales, blocksize, N, static_cast<float*>(y),
                        stream);
    case DType::kFloat16:
      return gemv_typed(static_cast<const __half*>(x), M, K, packed, scales, blocksize, N, static_cast<__half*>(y),
                        stream);
    case DType::kBFloat16:
      return gemv_typed(static_cast<const __nv_bfloat16*>(x), M, K, packed, scales, blocksize, N,
                        static_cast<__nv_bfloat16*>(y), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastllm::cuda
