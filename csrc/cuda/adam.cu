// The CUDA kernels of recap_kernels::fused_adam_ and BoundBucket.adam_step (the op and the block
// body are in adam.cuh).
#include "../common/bucket.h"
#include "adam.cuh"

namespace recap_kernels::cuda {
namespace {

template <typename S, bool AMSGRAD, WeightDecay WD>
__global__ void __launch_bounds__(kBlockSize)
    adam_kernel(LaunchTable table, const __grid_constant__ AdamGroups groups, AmpArgs amp, bool maximize) {
  adam_block<S, AMSGRAD, WD>(table, groups, amp, maximize, blockIdx.x, threadIdx.x);
}

struct AdamCudaLaunch : CudaLaunch {
  using CudaLaunch::CudaLaunch;

  template <typename S, bool AMSGRAD, WeightDecay WD>
  void adam(const LaunchTable& table, int64_t num_blocks, const AdamGroups& groups, const AmpArgs& amp,
            bool maximize) {
    adam_kernel<S, AMSGRAD, WD>
        <<<static_cast<unsigned>(num_blocks), kBlockSize, 0, stream()>>>(table, groups, amp, maximize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CUDA, m) {
  m.impl("fused_adam_", &fused_adam<AdamCudaLaunch>);
  device_kernels(c10::kCUDA).adam = &adam_records<AdamCudaLaunch>;  // BoundBucket.adam_step on CUDA tensors
}

}  // namespace recap_kernels::cuda
