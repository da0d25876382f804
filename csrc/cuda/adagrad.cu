// The CUDA kernels of recap_kernels::fused_adagrad_ and BoundBucket.adagrad_step (the op and the
// block body are in adagrad.cuh).
#include "../common/bucket.h"
#include "adagrad.cuh"

namespace recap_kernels::cuda {
namespace {

template <typename S>
__global__ void __launch_bounds__(kBlockSize)
    adagrad_kernel(LaunchTable table, const __grid_constant__ AdagradGroups groups, AmpArgs amp, bool maximize) {
  adagrad_block<S>(table, groups, amp, maximize, blockIdx.x, threadIdx.x);
}

struct AdagradCudaLaunch : CudaLaunch {
  using CudaLaunch::CudaLaunch;

  template <typename S>
  void adagrad(const LaunchTable& table, int64_t num_blocks, const AdagradGroups& groups, const AmpArgs& amp,
               bool maximize) {
    adagrad_kernel<S><<<static_cast<unsigned>(num_blocks), kBlockSize, 0, stream()>>>(table, groups, amp, maximize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CUDA, m) {
  m.impl("fused_adagrad_", &fused_adagrad<AdagradCudaLaunch>);
  device_kernels(c10::kCUDA).adagrad = &adagrad_records<AdagradCudaLaunch>;  // BoundBucket.adagrad_step
}

}  // namespace recap_kernels::cuda
