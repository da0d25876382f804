// The CUDA kernels of recap_kernels::fused_adam_ and fused_adam_bucket_ (the op and the block body
// are in adam.cuh).
#include "../common/bucket.h"
#include "adam.cuh"

namespace recap_kernels::cuda {
namespace {

template <typename S, bool AMSGRAD, bool DECOUPLED>
__global__ void __launch_bounds__(kBlockSize)
    adam_kernel(LaunchTable table, const __grid_constant__ AdamGroups groups, AmpArgs amp, bool maximize) {
  adam_block<S, AMSGRAD, DECOUPLED>(table, groups, amp, maximize, blockIdx.x, threadIdx.x);
}

struct AdamCudaLaunch : CudaLaunch {
  using CudaLaunch::CudaLaunch;

  template <typename S, bool AMSGRAD, bool DECOUPLED>
  void adam(const LaunchTable& table, int64_t num_blocks, const AdamGroups& groups, const AmpArgs& amp,
            bool maximize) {
    adam_kernel<S, AMSGRAD, DECOUPLED>
        <<<static_cast<unsigned>(num_blocks), kBlockSize, 0, stream()>>>(table, groups, amp, maximize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void fused_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_sizes,
                     at::ArrayRef<double> lrs, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                     at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                     at::ArrayRef<double> weight_decays, bool amsgrad, bool decoupled, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  fused_adam<AdamCudaLaunch>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, lrs,
                             lr_tensors, beta1s, beta2s, epss, weight_decays, amsgrad, decoupled, maximize, grad_scale,
                             found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CUDA, m) {
  m.impl("fused_adam_", &fused_adam_cuda);
  register_bound_bucket_class();  // its signature names the class
  m.impl("fused_adam_bucket_", &fused_adam_bucket<&fused_adam_cuda>);
}

}  // namespace recap_kernels::cuda
