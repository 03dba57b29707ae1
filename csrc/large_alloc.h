// Allocation of large CPU output tensors backed by 2 MiB ("huge") pages.
//
// The kernels of nf4_cpu.cpp write their outputs once, into freshly allocated memory. For a
// large output the time then goes to page faults, not to the kernel: glibc serves a request
// of 32 MiB or more with a new mmap on every call, so a 4096 x 4096 bf16 dequantize faults in
// (and the OS zeroes) 8192 pages of 4 KiB, ~10x the time of the kernel. With transparent huge
// pages allowed on the range (madvise(MADV_HUGEPAGE): honoured in the THP modes "madvise"
// and "always") the same 32 MiB takes 16 faults of 2 MiB pages.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastllm::cpu {

// An uninitialised contiguous CPU tensor like at::empty(sizes, dtype). From 32 MiB on (see
// kLargeBytes in large_alloc.cpp), on Linux, its memory starts on a 2 MiB boundary and its
// whole 2 MiB pages may be huge pages; smaller tensors, and other systems, use at::empty.
// The tensor owns its memory (freed when its storage dies) and behaves like any other.
at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace fastllm::cpu
