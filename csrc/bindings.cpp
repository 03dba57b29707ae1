// Registration of fastllm._C: the torch.ops.fastllm operator schemas, their CPU kernels
// (nf4_cpu.cpp) and, when built with nvcc (FASTLLM_WITH_CUDA), their CUDA kernels
// (nf4_cuda.cu, raw pointers, launched here on torch's current stream). Argument checks
// live here, shared by both devices. Fake (meta) kernels are registered in Python
// (fastllm/ops/nf4.py, the op registry) so torch.compile can trace the ops.
//
// Schemas (torch.ops.fastllm.*):
//   quantize_nf4(Tensor weight, int blocksize, bool double_quant, Tensor dynamic_map)
//       -> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset)
//     weight: fp32/fp16/bf16, any shape (flattened row-major), finite; blocksize in
//     {32, ..., 4096}; dynamic_map: fp32 [256], bitsandbytes' sorted signed dynamic map.
//     packed uint8 [(n + 1) / 2]; absmax fp32 [nblocks], or uint8 codes [nblocks] when
//     double_quant; nested_absmax fp32 [ceil(nblocks / 256)] and offset fp32 [] when
//     double_quant, else both empty fp32 [0].
//   decode_scales(Tensor absmax, Tensor nested_absmax, Tensor offset, Tensor dynamic_map) -> Tensor
//     absmax: uint8 codes [nblocks] of a double-quantized weight -> fp32 [nblocks] scales
//     dynamic_map[absmax] * nested_absmax[i / 256] + offset.
//   dequantize_nf4(Tensor packed, Tensor scales, int blocksize, int numel, ScalarType dtype) -> Tensor
//     packed uint8 [>= (numel + 1) / 2], scales fp32 [>= ceil(numel / blocksize)] ->
//     flat [numel] in dtype (fp32/fp16/bf16): (dtype) (code[q] * scale) computed in fp32.
//   nf4_gemv(Tensor x, Tensor packed, Tensor scales, int blocksize, int N) -> Tensor
//     x (M, K) fp32/fp16/bf16; packed uint8 [N * K / 2] (row n at bytes [n K / 2, (n + 1) K / 2));
//     scales fp32 [N * K / blocksize]; K % blocksize == 0 -> y (M, N) = x @ W^T in x.dtype,
//     accumulated in fp32 (for bf16 x the weights are rounded to bf16 first, as a dense bf16
//     matmul of the dequantized weight would). Meant for M <= 16: W is read from memory once
//     for all rows; any M is correct.
// Module functions: fastllm._C.cuda_built() -> bool, fastllm._C.nf4_code_table() -> fp32 [16].
#include <torch/extension.h>

#include "nf4.h"

#include <cstdint>
#include <limits>

#ifdef FASTLLM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastllm {
namespace {

bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

bool is_allowed_blocksize(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(is_allowed_blocksize(blocksize),
                    "blocksize must be a power of two in [32, 4096], got ", blocksize);
}

void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

void check_dynamic_map(const at::Tensor& ref, const char* ref_name, const at::Tensor& code_map) {
  check_dtype(code_map, "dynamic_map", at::kFloat);
  TORCH_CHECK_VALUE(code_map.numel() == 256, "dynamic_map must hold 256 values, got ", code_map.numel());
  check_same_device(ref, ref_name, code_map, "dynamic_map");
}

void check_quantize(const at::Tensor& weight, int64_t blocksize, const at::Tensor& code_map) {
  TORCH_CHECK_TYPE(is_float_dtype(weight.scalar_type()), "weight must be float32, float16 or bfloat16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.numel() > 0, "weight is empty (shape ", weight.sizes(), ")");
  check_blocksize(blocksize);
  check_dynamic_map(weight, "weight", code_map);
}

void check_decode_scales(const at::Tensor& codes, const at::Tensor& nested_absmax, const at::Tensor& offset,
                         const at::Tensor& code_map) {
  check_dtype(codes, "absmax", at::kByte);
  check_dtype(nested_absmax, "nested_absmax", at::kFloat);
  check_dtype(offset, "offset", at::kFloat);
  const int64_t want = (codes.numel() + kNestedBlocksize - 1) / kNestedBlocksize;
  TORCH_CHECK_VALUE(nested_absmax.numel() == want, "nested_absmax must hold ceil(absmax.numel() / 256) = ", want,
                    " values, got ", nested_absmax.numel());
  TORCH_CHECK_VALUE(offset.numel() == 1, "offset must hold one value, got ", offset.numel());
  check_same_device(codes, "absmax", nested_absmax, "nested_absmax");
  check_same_device(codes, "absmax", offset, "offset");
  check_dynamic_map(codes, "absmax", code_map);
}

void check_dequantize(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t numel,
                      at::ScalarType dtype) {
  check_dtype(packed, "packed", at::kByte);
  check_dtype(scales, "scales", at::kFloat);
  check_blocksize(blocksize);
  TORCH_CHECK_VALUE(numel >= 0, "numel must be >= 0, got ", numel);
  // Written as quotient + remainder: numel is a caller's int, and numel + 1 may overflow.
  const int64_t nbytes = numel / 2 + numel % 2;
  TORCH_CHECK_VALUE(packed.numel() >= nbytes, "packed must hold at least (numel + 1) / 2 = ", nbytes, " bytes, got ",
                    packed.numel());
  const int64_t nblocks = numel / blocksize + (numel % blocksize != 0);
  TORCH_CHECK_VALUE(scales.numel() >= nblocks, "scales must hold at least ceil(numel / blocksize) = ", nblocks,
                    " values, got ", scales.numel());
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float32, float16 or bfloat16, got ", dtype);
  check_same_device(packed, "packed", scales, "scales");
}

void check_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize,
                int64_t N) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M, K), got shape ", x.sizes());
  check_dtype(packed, "packed", at::kByte);
  check_dtype(scales, "scales", at::kFloat);
  check_blocksize(blocksize);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(K % blocksize == 0, "K = x.size(1) = ", K, " must be a multiple of blocksize ", blocksize);
  TORCH_CHECK_VALUE(N >= 0, "N must be >= 0, got ", N);
  TORCH_CHECK_VALUE(K == 0 || N <= std::numeric_limits<int64_t>::max() / K, "N * K = ", N, " * ", K,
                    " overflows int64");
  TORCH_CHECK_VALUE(packed.numel() == N * K / 2, "packed must hold N * K / 2 = ", N * K / 2, " bytes, got ",
                    packed.numel());
  TORCH_CHECK_VALUE(scales.numel() == N * K / blocksize, "scales must hold N * K / blocksize = ", N * K / blocksize,
                    " values, got ", scales.numel());
  check_same_device(x, "x", packed, "packed");
  check_same_device(x, "x", scales, "scales");
}

// ---------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& weight,
                                                                            int64_t blocksize, bool double_quant,
                                                                            const at::Tensor& code_map) {
  check_quantize(weight, blocksize, code_map);
  return cpu::quantize_nf4(weight, blocksize, double_quant, code_map);
}

at::Tensor decode_scales_cpu(const at::Tensor& codes, const at::Tensor& nested_absmax, const at::Tensor& offset,
                             const at::Tensor& code_map) {
  check_decode_scales(codes, nested_absmax, offset, code_map);
  return cpu::decode_scales(codes, nested_absmax, offset, code_map);
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t numel,
                              at::ScalarType dtype) {
  check_dequantize(packed, scales, blocksize, numel, dtype);
  return cpu::dequantize_nf4(packed, scales, blocksize, numel, dtype);
}

at::Tensor nf4_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize,
                        int64_t N) {
  check_gemv(x, packed, scales, blocksize, N);
  return cpu::nf4_gemv(x, packed, scales, blocksize, N);
}

// ---------------------------------------------------------------------------------------
// CUDA: allocate with torch, launch the raw-pointer kernels on the current stream
// ---------------------------------------------------------------------------------------

#ifdef FASTLLM_WITH_CUDA
DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : (t == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& weight,
                                                                             int64_t blocksize, bool double_quant,
                                                                             const at::Tensor& code_map) {
  check_quantize(weight, blocksize, code_map);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const auto f32 = w.options().dtype(at::kFloat);
  const auto u8 = w.options().dtype(at::kByte);
  at::Tensor packed = at::empty({(n + 1) / 2}, u8);
  at::Tensor absmax = at::empty({nblocks}, f32);
  at::Tensor nonfinite = at::zeros({1}, w.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::quantize_nf4(w.const_data_ptr(), to_dtype(w.scalar_type()), n, static_cast<int>(blocksize),
                                    packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
                                    reinterpret_cast<unsigned long long*>(nonfinite.mutable_data_ptr<int64_t>()),
                                    current_stream()));
  const int64_t bad = nonfinite.item<int64_t>();
  TORCH_CHECK_VALUE(bad == 0, "weight has ", bad, " non-finite values (NaN or Inf); refusing to quantize");
  if (!double_quant) return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32)};
  at::Tensor offset = at::mean(absmax);  // torch's CUDA mean, as bitsandbytes uses
  at::Tensor codes = at::empty({nblocks}, u8);
  at::Tensor nested = at::empty({(nblocks + kNestedBlocksize - 1) / kNestedBlocksize}, f32);
  const at::Tensor cmap = code_map.contiguous();
  C10_CUDA_CHECK(cuda::quantize_nested(absmax.const_data_ptr<float>(), nblocks, offset.const_data_ptr<float>(),
                                       cmap.const_data_ptr<float>(), codes.mutable_data_ptr<uint8_t>(),
                                       nested.mutable_data_ptr<float>(), current_stream()));
  return {packed, codes, nested, offset};
}

at::Tensor decode_scales_cuda(const at::Tensor& codes, const at::Tensor& nested_absmax, const at::Tensor& offset,
                              const at::Tensor& code_map) {
  check_decode_scales(codes, nested_absmax, offset, code_map);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor q = codes.contiguous();
  const at::Tensor nested = nested_absmax.contiguous();
  const at::Tensor cmap = code_map.contiguous();
  const at::Tensor off = offset.contiguous();
  at::Tensor scales = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::decode_scales(q.const_data_ptr<uint8_t>(), nested.const_data_ptr<float>(),
                                     off.const_data_ptr<float>(), cmap.const_data_ptr<float>(), q.numel(),
                                     scales.mutable_data_ptr<float>(), current_stream()));
  return scales;
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t numel,
                               at::ScalarType dtype) {
  check_dequantize(packed, scales, blocksize, numel, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  const at::Tensor s = scales.contiguous();
  at::Tensor out = at::empty({numel}, p.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::dequantize_nf4(p.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), numel,
                                      static_cast<int>(blocksize), out.mutable_data_ptr(), to_dtype(dtype),
                                      current_stream()));
  return out;
}

at::Tensor nf4_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize,
                         int64_t N) {
  check_gemv(x, packed, scales, blocksize, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  // The kernel reads W as 32-bit words: a view starting at an odd byte (a slice of a larger
  // buffer) is copied into a fresh, aligned allocation.
  at::Tensor p = packed.contiguous();
  if (reinterpret_cast<uintptr_t>(p.const_data_ptr()) % alignof(uint32_t) != 0) p = p.clone();
  const at::Tensor s = scales.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  C10_CUDA_CHECK(cuda::nf4_gemv(xc.const_data_ptr(), to_dtype(x.scalar_type()), x.size(0), x.size(1),
                                p.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), static_cast<int>(blocksize),
                                N, y.mutable_data_ptr(), current_stream()));
  return y;
}
#endif

at::Tensor nf4_code_table() { return torch::tensor(std::vector<float>(std::begin(kNF4Code), std::end(kNF4Code))); }

bool cuda_built() {
#ifdef FASTLLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastllm

TORCH_LIBRARY(fastllm, m) {
  m.def(
      "quantize_nf4(Tensor weight, int blocksize, bool double_quant, Tensor dynamic_map) -> "
      "(Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset)");
  m.def("decode_scales(Tensor absmax, Tensor nested_absmax, Tensor offset, Tensor dynamic_map) -> Tensor");
  m.def("dequantize_nf4(Tensor packed, Tensor scales, int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def("nf4_gemv(Tensor x, Tensor packed, Tensor scales, int blocksize, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("quantize_nf4", &fastllm::quantize_nf4_cpu);
  m.impl("decode_scales", &fastllm::decode_scales_cpu);
  m.impl("dequantize_nf4", &fastllm::dequantize_nf4_cpu);
  m.impl("nf4_gemv", &fastllm::nf4_gemv_cpu);
}

#ifdef FASTLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("quantize_nf4", &fastllm::quantize_nf4_cuda);
  m.impl("decode_scales", &fastllm::decode_scales_cuda);
  m.impl("dequantize_nf4", &fastllm::dequantize_nf4_cuda);
  m.impl("nf4_gemv", &fastllm::nf4_gemv_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastllm C++/CUDA kernels; importing registers the torch.ops.fastllm operators";
  m.def("cuda_built", &fastllm::cuda_built, "True when the CUDA kernels were compiled in");
  m.def("nf4_code_table", &fastllm::nf4_code_table, "The C++ copy of the NF4 code table, fp32 [16]");
}
