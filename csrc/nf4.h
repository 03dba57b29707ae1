// The NF4 format shared by the C++ (CPU) and CUDA kernels of fastllm._C.
//
// This header is the single C++ copy of the NF4 code table (tests check it against
// fastllm.codebook.NF4_CODE) and declares the kernels of both backends. It includes no
// torch header in the part the CUDA file sees: nf4_cuda.cu is compiled by plain nvcc
// with raw pointers and a cudaStream_t.
//
// Byte format (bitsandbytes >= 0.46, quant_type="nf4"): blocks of `blocksize`
// consecutive elements of the row-major flattened weight, one fp32 absmax per block,
// two 4-bit codes per byte with the first element in the HIGH nibble, an odd count
// padded with the code of 0.0 (7). Double quantization stores (absmax - mean(absmax))
// as 8-bit codes of the signed dynamic map, in blocks of 256, plus one fp32 absmax per
// 256-block and the fp32 mean ("offset").
#pragma once

#include <cstdint>

// The 16 NF4 values (quantiles of N(0, 1) normalised to [-1, 1]), index 0..15. Each
// decimal is the exact value of an fp32 number, so the `f` literal is that number.
#define FASTLLM_NF4_CODE_VALUES                                                                                     \
  {                                                                                                                 \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,                \
        -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,             \
        0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, \
        1.0f                                                                                                        \
  }

namespace fastllm {

constexpr float kNF4Code[16] = FASTLLM_NF4_CODE_VALUES;
constexpr int kNF4ZeroIndex = 7;        // code of 0.0: padding nibble and code of an all-zero block
constexpr int kNestedBlocksize = 256;   // double quantization block length
constexpr int kLutSize = 65536;         // points of the uniform grid of the 8-bit quantizer
constexpr float kMinScale = 1e-38f;     // absmax is clamped to this before dividing (as bnb does)

// Output dtypes of dequantize / gemv, as plain numbers so CUDA code needs no torch header.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace fastllm

// FASTLLM_NF4_FORMAT_ONLY: only the constants above (the ISA-specific CPU translation units, which
// must include no header with inline functions; see nf4_cpu_isa.h).
#if (defined(__CUDACC__) || defined(FASTLLM_WITH_CUDA)) && !defined(FASTLLM_NF4_FORMAT_ONLY)
#include <cuda_runtime_api.h>

// CUDA launchers (csrc/nf4_cuda.cu). All pointers are device pointers of contiguous
// buffers; every launcher enqueues on `stream` and returns the launch error.
namespace fastllm::cuda {

// 4-bit pass: absmax [ceil(n / blocksize)] fp32 and packed [(n + 1) / 2] uint8 from x [n];
// adds the number of Inf/NaN inputs to *nonfinite (zeroed by the caller).
cudaError_t quantize_nf4(const void* x, DType x_dtype, int64_t n, int blocksize, uint8_t* packed, float* absmax,
                         unsigned long long* nonfinite, cudaStream_t stream);

// 8-bit pass of double quantization: codes [n] and nested_absmax [ceil(n / 256)] of
// (absmax - *offset), `code_map` the sorted 256-entry dynamic map.
cudaError_t quantize_nested(const float* absmax, int64_t n, const float* offset, const float* code_map,
                            uint8_t* codes, float* nested_absmax, cudaStream_t stream);

// scales [n] = code_map[codes] * nested_absmax[i / 256] + *offset (fp32, no FMA).
cudaError_t decode_scales(const uint8_t* codes, const float* nested_absmax, const float* offset,
                          const float* code_map, int64_t n, float* scales, cudaStream_t stream);

// out [n] = (dtype) (code[nibble] * scales[i / blocksize]).
cudaError_t dequantize_nf4(const uint8_t* packed, const float* scales, int64_t n, int blocksize, void* out,
                           DType out_dtype, cudaStream_t stream);

// y [M, N] = x [M, K] @ W^T with W given as packed [N * K / 2] and scales [N * K / blocksize].
cudaError_t nf4_gemv(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
                     int blocksize, int64_t N, void* y, cudaStream_t stream);

}  // namespace fastllm::cuda
#endif

#if !defined(__CUDACC__) && !defined(FASTLLM_NF4_FORMAT_ONLY)
#include <ATen/core/Tensor.h>

#include <tuple>

// CPU kernels (csrc/nf4_cpu.cpp); argument checks live in bindings.cpp.
namespace fastllm::cpu {

// (packed, absmax, nested_absmax, offset); the last two are empty unless double_quant.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight, int64_t blocksize,
                                                                        bool double_quant,
                                                                        const at::Tensor& code_map);

at::Tensor decode_scales(const at::Tensor& codes, const at::Tensor& nested_absmax, const at::Tensor& offset,
                         const at::Tensor& code_map);

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype);

at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize,
                    int64_t N);

}  // namespace fastllm::cpu
#endif
