// See large_alloc.h. This is the idea of torch's CPU allocator in its THP mode
// (THP_MEM_ALLOC_ENABLE=1, off by default), applied to the large outputs of this extension.
#include "large_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastllm::cpu {
namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)

constexpr size_t kHugePage = size_t{2} << 20;  // x86-64 / arm64 (4 KiB base pages) PMD size

// glibc's malloc serves a request from 32 MiB on (its largest mmap threshold on 64-bit) with
// a fresh mmap every time, freed by munmap: this is the size where every call pays the page
// faults. Below it, a freed block is reused from the heap, already faulted in, which is
// faster still (glibc raises its mmap threshold to the size of each mmap'ed block freed).
constexpr int64_t kLargeBytes = int64_t{32} << 20;

// Hands out 2 MiB-aligned memory and asks the kernel to back its whole 2 MiB pages with
// huge pages. A partial last page is left out of the advice, so at most the memory the
// tensor uses is ever faulted in. The advice is a hint: with THP "never", or a kernel
// without THP (madvise then fails with EINVAL), the memory is ordinary 4 KiB pages.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nullptr;
    if (nbytes > 0) {
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&ptr, kHugePage, nbytes) == 0,
                       "fastllm: failed to allocate ", nbytes, " bytes of CPU memory");
      const size_t whole_pages = nbytes / kHugePage * kHugePage;
      if (whole_pages > 0) madvise(ptr, whole_pages, MADV_HUGEPAGE);  // a failed hint is harmless
    }
    return {ptr, ptr, &std::free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &std::free; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

HugePageAllocator huge_page_allocator;

at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &huge_page_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

#endif

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (nbytes >= kLargeBytes) return empty_huge(sizes, dtype);
#endif
  return at::empty(sizes, at::TensorOptions().dtype(dtype));
}

}  // namespace fastllm::cpu
