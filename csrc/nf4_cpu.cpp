// CPU kernels of fastllm._C: NF4 quantize (with double quantization), scale decoding,
// dequantize and the small-M dequantize-GEMV, and the choice of instruction set.
//
// Quantize and dequantize reproduce fastllm/reference.py (and so bitsandbytes) bit for
// bit. setup.py builds every file with -ffp-contract=off so that no multiply-add is fused
// where the reference rounds twice. This file is built for the baseline x86-64; the hot
// block loops come from one of the IsaKernels variants (nf4_cpu_isa.h: AVX-512, AVX2 or
// scalar, chosen at run time), which all compute the same bytes. Here: the threading (every
// loop is split over blocks or output features with at::parallel_for), the dtype plumbing
// and the parts that are not hot enough to specialise (the 8-bit pass, scale decoding).
// The dequantize output, when large, is allocated on huge pages (large_alloc.h).
#include "large_alloc.h"
#include "nf4.h"
#include "nf4_cpu_generic.h"
#include "nf4_cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/to.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

// Dispatch over the three floating dtypes fastllm supports (fp32, fp16, bf16).
#define FASTLLM_DISPATCH_FLOAT(TYPE, NAME, ...)                                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastllm::cpu {

// ---------------------------------------------------------------------------------------
// Instruction set: chosen once per process
// ---------------------------------------------------------------------------------------

namespace {

constexpr IsaKernels kScalar{"scalar",           &generic_block_absmax, &generic_quantize_block, &generic_lookup_f32,
                             &generic_lookup_u16, &generic_gemv,        nullptr};

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::string(isa) == "avx512")  // the features the pragma of nf4_cpu_avx512.cpp enables
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::string(isa) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return std::string(isa) == "scalar";
}

// The variant named `isa` if this build has it and this CPU runs it, else nullptr.
const IsaKernels* runnable(const std::string& isa) {
  const IsaKernels* k = isa == "avx512" ? avx512_kernels() : isa == "avx2" ? avx2_kernels() : &scalar_kernels();
  return k != nullptr && cpu_has(isa.c_str()) ? k : nullptr;
}

const IsaKernels& resolve_kernels() {
  const char* forced = std::getenv("FASTLLM_CPU_ISA");
  if (forced == nullptr || *forced == '\0') {
    for (const char* isa : {"avx512", "avx2"})
      if (const IsaKernels* k = runnable(isa)) return *k;
    return scalar_kernels();
  }
  const std::string want(forced);
  TORCH_CHECK_VALUE(want == "avx512" || want == "avx2" || want == "scalar",
                    "FASTLLM_CPU_ISA must be one of avx512, avx2, scalar (or unset for the best this CPU runs), got '",
                    want, "'");
  const IsaKernels* k = runnable(want);
  std::string here;
  for (const char* isa : {"avx512", "avx2", "scalar"})
    if (runnable(isa) != nullptr) here += (here.empty() ? "" : ", ") + std::string(isa);
  TORCH_CHECK_VALUE(k != nullptr, "FASTLLM_CPU_ISA=", want, ": this CPU (or this build of fastllm._C) cannot run the ",
                    want, " kernels; it runs: ", here);
  return *k;
}

}  // namespace

const IsaKernels& scalar_kernels() { return kScalar; }

const IsaKernels& kernels() {
  // Resolved on first use, not at load: a bad FASTLLM_CPU_ISA then fails the op call with a
  // clear error (every call, as the static stays uninitialised) instead of the import.
  static const IsaKernels& chosen = resolve_kernels();
  return chosen;
}

namespace {

std::string cpu_isa() { return kernels().name; }

// ---------------------------------------------------------------------------------------
// Dtype helpers
// ---------------------------------------------------------------------------------------

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

template <>
void load_fp32<c10::Half>(const c10::Half* src, float* dst, int64_t len) {
  if (const auto convert = kernels().half_to_float) {
    convert(reinterpret_cast<const uint16_t*>(src), dst, len);
    return;
  }
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

// ---------------------------------------------------------------------------------------
// Quantize: 4-bit pass
// ---------------------------------------------------------------------------------------

template <typename T>
int64_t quantize_4bit(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const IsaKernels& isa = kernels();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  std::atomic<int64_t> nonfinite{0};
  // ~64K elements per task: large enough to amortise the thread start-up.
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(blocksize);
    int64_t bad = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      load_fp32(x + start, buf.data(), len);
      const float amax = isa.block_absmax(buf.data(), len, &bad);
      absmax[b] = amax;
      isa.quantize_block(buf.data(), len, amax, len == blocksize, packed + start / 2);
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

// A block takes only 16 distinct values, (T) (code[c] * scale) computed in fp32 and rounded once
// (round to nearest even, as Tensor.to); the ISA kernel then looks each nibble up in that table.
template <typename T>
void dequantize_block(const IsaKernels& isa, const uint8_t* p, int64_t len, float scale, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    float table[16];
    for (int c = 0; c < 16; ++c) table[c] = kNF4Code[c] * scale;
    isa.lookup_f32(p, len, table, out);
  } else {
    uint16_t table[16];
    for (int c = 0; c < 16; ++c) table[c] = static_cast<T>(kNF4Code[c] * scale).x;
    isa.lookup_u16(p, len, table, reinterpret_cast<uint16_t*>(out));
  }
}

template <typename T>
void dequantize_all(const uint8_t* packed, const float* scales, int64_t n, int64_t blocksize, T* out) {
  const IsaKernels& isa = kernels();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      dequantize_block(isa, packed + start / 2, std::min(blocksize, n - start), scales[b], out + start);
    }
  });
}

// ---------------------------------------------------------------------------------------
// GEMV: y[m, n] = sum_k x[m, k] * W[n, k] for small M
// ---------------------------------------------------------------------------------------

// y (M, N) fp32 from x (M, K) fp32 held with row stride ldx, split over output features (the ISA
// kernel tiles W so that each tile is read from memory once for all rows of x).
void gemv_driver(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
                 int64_t blocksize, bool bf16_weights, int64_t N, float* y) {
  const IsaKernels& isa = kernels();
  const int64_t grain = std::max<int64_t>(kGemvTileN, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    isa.gemv(x, ldx, M, K, packed, scales, blocksize, bf16_weights, n0, n1, y, N);
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
  // x is widened to fp32 (exactly) into rows padded by 64 bytes: rows K * 4 bytes apart (a multiple
  // of 4 KiB for the usual K) would all map to the same L1 cache sets and evict each other. For
  // bf16 x the weights are rounded to bf16 (as a dense bf16 matmul of the dequantized weight has
  // them); each bf16 x bf16 product is exact in fp32.
  const int64_t ldx = K + 16;
  at::Tensor xf = at::empty({M, ldx}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, K).copy_(x);
  gemv_driver(xf.const_data_ptr<float>(), ldx, M, K, p.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), blocksize,
              x.scalar_type() == at::kBFloat16, N, y.mutable_data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace fastllm::cpu

// fastllm::cpu_isa() -> str: the CPU kernel variant this process runs ("avx512", "avx2" or "scalar").
TORCH_LIBRARY_FRAGMENT(fastllm, m) { m.def("cpu_isa() -> str", &fastllm::cpu::cpu_isa); }
