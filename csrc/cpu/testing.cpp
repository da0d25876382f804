// Test-only CPU ops that drive the shared headers directly (tests/test_math_edges.py).
#include <cstdint>

#include <torch/library.h>

#include "../common/arguments.h"
#include "recap_kernels/convert.h"

namespace recap_kernels::cpu {
namespace {

template <typename To, typename From>
void convert_elements(void* out, const void* src, int64_t n) {
  const auto* in = static_cast<const typename Storage<From>::raw_t*>(src);
  auto* dst = static_cast<typename Storage<To>::raw_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    // Widening is exact; narrowing rounds once, as the kernels' stores do.
    dst[i] = Storage<To>::store(static_cast<typename Storage<To>::math_t>(Storage<From>::load(in[i])));
  }
}

// out = src converted with convert.h's load (src dtype) and store (out dtype).
void convert_cpu(const at::Tensor& out, const at::Tensor& src) {
  TORCH_CHECK(out.is_cpu() && src.is_cpu(), "_convert_ takes CPU tensors");
  TORCH_CHECK(out.is_contiguous() && src.is_contiguous(), "_convert_ takes contiguous tensors");
  TORCH_CHECK(out.numel() == src.numel(), "_convert_: out has ", out.numel(), " elements, src ", src.numel());
  dispatch_storage(out.scalar_type(), "_convert_", [&](auto to) {
    dispatch_storage(src.scalar_type(), "_convert_", [&](auto from) {
      convert_elements<decltype(to), decltype(from)>(out.data_ptr(), src.data_ptr(), src.numel());
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) { m.impl("_convert_", &convert_cpu); }

}  // namespace recap_kernels::cpu
