// Which build of torch's fused CPU optimizer kernels runs in this process (multi_tensor.h,
// TorchCpuKernel): the CPU kernels follow its arithmetic loop by loop (Note [CPU tail order] in
// recap_kernels/adam_math.h).
//
// Note [torch's kernel builds]
// ATen compiles FusedAdamKernel.cpp and FusedAdagradKernel.cpp once per CPU capability it was built
// for and registers each build in a DispatchStub (fused_adam_stub, fused_adagrad_stub). Its
// DispatchStubImpl::choose_cpu_impl picks, by at::native::get_cpu_capability() (the CPU's, or
// ATEN_CPU_CAPABILITY's):
//   * AVX512: the AVX-512 build, or the AVX2 build where the stub has no AVX-512 one;
//   * AVX2: the AVX2 build;
//   * anything else: the DEFAULT build (no FMA instruction).
// torch 2.14's x86-64 wheels have no AVX-512 build of either kernel (the exported
// DispatchStub<...>::AVX512 entries are null), so AVX-512 CPUs run the AVX2 one. The entry is declared
// only where HAVE_AVX512_CPU_DEFINITION is defined, which torch defines for its own build alone; this
// translation unit defines it (and HAVE_AVX2_CPU_DEFINITION, as torch's x86-64 build does) to read
// the entry, and calls nothing through a stub. at::native::get_cpu_capability() is not exported;
// at::get_cpu_capability() (ATen/Version.h) names the same value.
#if defined(__x86_64__)
#define HAVE_AVX512_CPU_DEFINITION 1
#define HAVE_AVX2_CPU_DEFINITION 1
#endif

// torch's context headers (which ATen/Version.h reaches) have unused parameters that g++ -Wextra flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include <ATen/Version.h>
#pragma GCC diagnostic pop
#include <ATen/native/FusedAdagrad.h>
#include <ATen/native/FusedAdam.h>

#include <string>

#include "multi_tensor.h"

namespace recap_kernels::cpu {
namespace {

// ``has_avx512_build``: whether the stub has an AVX-512 kernel.
TorchCpuKernel choose(bool has_avx512_build) {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return TorchCpuKernel{true, has_avx512_build ? 64 : 32};
  }
  if (capability == "AVX2") {
    return TorchCpuKernel{true, 32};
  }
  // DEFAULT's Vectorized<T> is 32 bytes wide too (VECTOR_WIDTH in ATen/cpu/vec/vec_base.h).
  return TorchCpuKernel{false, 32};
}

}  // namespace

const TorchCpuKernel& torch_fused_adam_kernel() {
#if defined(__x86_64__)
  static const TorchCpuKernel kernel = choose(at::native::fused_adam_stub_DECLARE_DISPATCH_type::AVX512 != nullptr);
#else
  static const TorchCpuKernel kernel = choose(false);
#endif
  return kernel;
}

const TorchCpuKernel& torch_fused_adagrad_kernel() {
#if defined(__x86_64__)
  static const TorchCpuKernel kernel =
      choose(at::native::fused_adagrad_stub_DECLARE_DISPATCH_type::AVX512 != nullptr);
#else
  static const TorchCpuKernel kernel = choose(false);
#endif
  return kernel;
}

}  // namespace recap_kernels::cpu
