// The CUDA kernels of recap_kernels::fused_adagrad_ and fused_adagrad_bucket_ (the op and the block
// body are in adagrad.cuh).
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

void fused_adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> lrs,
                        const c10::List<std::optional<at::Tensor>>& lr_tensors, at::ArrayRef<double> lr_decays,
                        at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays, bool maximize,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  fused_adagrad<AdagradCudaLaunch>(params, grads, state_sums, state_steps, group_sizes, lrs, lr_tensors, lr_decays,
                                   epss, weight_decays, maximize, grad_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CUDA, m) {
  m.impl("fused_adagrad_", &fused_adagrad_cuda);
  register_bound_bucket_class();  // its signature names the class
  m.impl("fused_adagrad_bucket_", &fused_adagrad_bucket<&fused_adagrad_cuda>);
}

}  // namespace recap_kernels::cuda
