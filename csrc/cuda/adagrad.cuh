// recap_kernels::fused_adagrad_ on the GPU (schema in ../ops.cpp): the block body of the update
// kernel and the op, written once for the CUDA kernels (adagrad.cu) and the test-only host
// emulation (emulate.cu). One launch updates every tensor of a bucket, across param groups (Note
// [Multi-tensor launch] in multi_tensor.cuh), with the update of recap_kernels/adagrad_math.h.
//
// The operation order is that of torch's fused CUDA Adagrad (adagrad_update_cuda) where the torch the
// extension is built against has one (torch >= 2.12), so bfloat16/float16 results match torch's
// fused CUDA step; against an older torch, whose only fused Adagrad is the CPU kernel, it is that
// kernel's (adagrad_update), and they match torch's fused CPU step (Note [CUDA Adagrad order]).
// Specialized at compile time on the storage dtype; weight decay, maximize and AMP are uniform
// run-time branches. Step counters advance before the update (multi_tensor.cuh).
#pragma once

#include <torch/library.h>

#include <type_traits>

#include "../common/arguments.h"
#include "multi_tensor.cuh"
#include "recap_kernels/adagrad_math.h"

#ifndef RECAP_KERNELS_TORCH_CUDA_FUSED_ADAGRAD
#error "setup.py defines RECAP_KERNELS_TORCH_CUDA_FUSED_ADAGRAD (Note [CUDA Adagrad order] in adagrad_math.h)"
#endif

namespace recap_kernels::cuda {

// Whether this build follows torch's fused CUDA Adagrad (else torch's fused CPU Adagrad's order).
constexpr bool kTorchCudaAdagrad = RECAP_KERNELS_TORCH_CUDA_FUSED_ADAGRAD != 0;

// The per-tensor scalars of the order this build follows.
template <typename M>
using AdagradBlockScalars = std::conditional_t<kTorchCudaAdagrad, AdagradCudaScalars, AdagradScalars<M>>;

// The hyperparameters of a launch's groups: a kernel argument (read through __grid_constant__).
struct AdagradGroups {
  AdagradGroup group[kMaxLaunchGroups];
};

// The scalars of one tensor's step; ``step`` is the step being taken (the counter was advanced already).
template <typename M>
RK_HOST_DEVICE AdagradBlockScalars<M> adagrad_block_scalars(const AdagradGroup& hp, float step, bool maximize) {
  if constexpr (kTorchCudaAdagrad) {
    return adagrad_cuda_scalars(hp.lr.get(), hp.lr_decay, hp.eps, hp.weight_decay, step, maximize);
  } else {
    return adagrad_scalars<M>(hp.lr.get(), hp.lr_decay, hp.eps, hp.weight_decay, double(step), maximize);
  }
}

// One element, in place on raw storage values.
template <typename S>
RK_HOST_DEVICE void adagrad_element(typename Storage<S>::raw_t& param, typename Storage<S>::raw_t& grad,
                                    typename Storage<S>::raw_t& state_sum,
                                    const AdagradBlockScalars<typename Storage<S>::math_t>& s, bool weight_decay,
                                    const float* grad_scale, float scale) {
  using St = Storage<S>;
  using M = typename St::math_t;
  M p = St::load(param);
  M g = St::load(grad);
  if (grad_scale != nullptr) {
    // torch's CUDA kernel divides in double and rounds to M: the same number (Note [CUDA Adagrad order]).
    g = unscale_grad(g, M(scale));
    grad = St::store(g);
  }
  M sum = St::load(state_sum);
  if constexpr (kTorchCudaAdagrad) {
    if (weight_decay) {
      adagrad_update_cuda<M, true>(p, g, sum, s);
    } else {
      adagrad_update_cuda<M, false>(p, g, sum, s);
    }
  } else {
    if (weight_decay) {
      adagrad_update<M, true>(p, g, sum, s);
    } else {
      adagrad_update<M, false>(p, g, sum, s);
    }
  }
  param = St::store(p);
  state_sum = St::store(sum);
}

// Thread ``thread`` of block ``block`` (of kBlockSize): as adam_block in adam.cuh.
template <typename S>
RK_HOST_DEVICE void adagrad_block(const LaunchTable& table, const AdagradGroups& groups, const AmpArgs& amp,
                                  bool maximize, int64_t block, int32_t thread) {
  using R = typename Storage<S>::raw_t;
  using M = typename Storage<S>::math_t;
  if (amp.skip()) {
    return;
  }
  const BlockWork work = block_work(table, block);
  const AdagradGroup& hp = groups.group[work.entry.group];
  const AdagradBlockScalars<M> s = adagrad_block_scalars<M>(hp, *work.entry.step, maximize);
  const bool weight_decay = hp.weight_decay != 0.0;
  const float scale = amp.grad_scale != nullptr ? *amp.grad_scale : 1.0f;
  R* __restrict__ param = static_cast<R*>(work.entry.slots[kParamSlot]) + work.offset;
  R* __restrict__ grad = static_cast<R*>(work.entry.slots[kGradSlot]) + work.offset;
  R* __restrict__ state_sum = static_cast<R*>(work.entry.slots[kStateSumSlot]) + work.offset;

  int32_t scalar_begin = 0;
  if (work.entry.aligned) {
    constexpr int32_t kWidth = Vector<R>::kSize;
    const int32_t num_vectors = work.size / kWidth;
    for (int32_t v = thread; v < num_vectors; v += kBlockSize) {
      const int32_t i = v * kWidth;
      Vector<R> p = load_vector(param + i);
      Vector<R> g = load_vector(grad + i);
      Vector<R> sum = load_vector(state_sum + i);
      for (int k = 0; k < kWidth; ++k) {  // a constant trip count: unrolled (ptxas: no stack frame)
        adagrad_element<S>(p.v[k], g.v[k], sum.v[k], s, weight_decay, amp.grad_scale, scale);
      }
      store_vector(param + i, p);
      if (amp.grad_scale != nullptr) {
        store_vector(grad + i, g);
      }
      store_vector(state_sum + i, sum);
    }
    scalar_begin = num_vectors * kWidth;
  }
  // The tail after the last whole vector, or every element of a tensor with a misaligned slot.
  for (int32_t i = scalar_begin + thread; i < work.size; i += kBlockSize) {
    adagrad_element<S>(param[i], grad[i], state_sum[i], s, weight_decay, amp.grad_scale, scale);
  }
}


// The kernel of a step (arguments.h's AdagradKernel) on ``Launch``, which provides
// ``template <S> adagrad(table, num_blocks, groups, amp, maximize)``; as adam_records in adam.cuh.
template <typename Launch>
void adagrad_records(const StepTensors& tensors, const std::vector<AdagradGroup>& groups, bool maximize,
                     const AmpArgs& amp) {
  const HostTables tables = build_tables(tensors.records, static_cast<int32_t>(groups.size()));
  Launch launch(tensors.device);
  dispatch_storage(tensors.dtype, "fused_adagrad_", [&](auto tag) {
    using S = decltype(tag);
    run_launches(launch, tables, amp, [&](const HostTables::Segment& segment, const LaunchTable& table) {
      AdagradGroups launch_groups{};
      for (int32_t g = 0; g < segment.num_groups; ++g) {
        launch_groups.group[g] = groups[segment.first_group + g];
      }
      launch.template adagrad<S>(table, segment.num_blocks, launch_groups, amp, maximize);
    });
  });
}

// fused_adagrad_ on ``Launch``'s device.
template <typename Launch>
void fused_adagrad(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList state_steps,
                   at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
                   const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const ListCall call = adagrad_list_call(params, grads, state_sums, state_steps, group_sizes, hyper.size(),
                                          lr_tensors.size(), Launch::kDeviceType);
  run_adagrad(&adagrad_records<Launch>, call.tensors(), group_sizes, hyper, lr_tensors, maximize, grad_scale,
              found_inf);
  bump_versions({params, state_sums, state_steps});
  if (grad_scale.has_value()) {
    bump_versions({grads});
  }
}

}  // namespace recap_kernels::cuda
