// recap_kernels::fused_adam_ on the GPU (schema in ../ops.cpp): the block body of the update
// kernel and the op, written once for the CUDA kernels (adam.cu) and the test-only host emulation
// (emulate.cu). One launch updates every tensor of a bucket, across param groups (Note
// [Multi-tensor launch] in multi_tensor.cuh), with adam_update_cuda of recap_kernels/adam_math.h,
// in torch's CUDA operation order.
//
// Specialized at compile time on the storage dtype, amsgrad and Adam/AdamW, which keeps each
// kernel to the registers it needs (bench/README.md has ptxas's counts); maximize, AMP and a zero
// weight decay are uniform run-time branches. Step counters advance in a small launch first.
#pragma once

#include <torch/library.h>

#include "../common/arguments.h"
#include "multi_tensor.cuh"
#include "recap_kernels/adam_math.h"

#ifndef RECAP_KERNELS_TORCH_CUDA_ADAM_OPMATH
#error "setup.py defines RECAP_KERNELS_TORCH_CUDA_ADAM_OPMATH (Note [CUDA operation order] in adam_math.h)"
#endif

namespace recap_kernels::cuda {

constexpr bool kOpmath = RECAP_KERNELS_TORCH_CUDA_ADAM_OPMATH != 0;

// The hyperparameters of a launch's groups: a kernel argument (read through __grid_constant__).
struct AdamGroups {
  AdamGroup group[kMaxLaunchGroups];
};

// One element, in place on raw storage values.
template <typename S, bool AMSGRAD, WeightDecay WD>
RK_HOST_DEVICE void adam_element(typename Storage<S>::raw_t& param, typename Storage<S>::raw_t& grad,
                                 typename Storage<S>::raw_t& exp_avg, typename Storage<S>::raw_t& exp_avg_sq,
                                 typename Storage<S>::raw_t& max_exp_avg_sq,
                                 const AdamCudaScalars<typename Storage<S>::math_t, kOpmath>& s, const float* grad_scale,
                                 float scale, bool maximize) {
  using St = Storage<S>;
  using M = typename St::math_t;
  M p = St::load(param);
  M g = St::load(grad);
  if (grad_scale != nullptr) {
    g = unscale_grad_cuda<M, kOpmath>(g, scale);
    grad = St::store(g);  // written back (unscaled) only when unscaling, as torch's fused step does
  }
  M m = St::load(exp_avg);
  M v = St::load(exp_avg_sq);
  M v_max = M(0);
  if constexpr (AMSGRAD) {
    v_max = St::load(max_exp_avg_sq);
  }
  adam_update_cuda<M, kOpmath, AMSGRAD, WD>(p, g, m, v, v_max, s, maximize);
  param = St::store(p);
  exp_avg = St::store(m);
  exp_avg_sq = St::store(v);
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = St::store(v_max);
  }
}

// Thread ``thread`` of block ``block`` (of kBlockSize): its share of the block's chunk, 128 bits
// at a time where every slot is aligned, then the tail element by element.
template <typename S, bool AMSGRAD, WeightDecay WD>
RK_HOST_DEVICE void adam_block(const LaunchTable& table, const AdamGroups& groups, const AmpArgs& amp, bool maximize,
                               int64_t block, int32_t thread) {
  using R = typename Storage<S>::raw_t;
  using M = typename Storage<S>::math_t;
  if (amp.skip()) {
    return;
  }
  const BlockWork work = block_work(table, block);
  const AdamGroup& hp = groups.group[work.entry.group];
  const AdamCudaScalars<M, kOpmath> s =
      adam_cuda_scalars<M, kOpmath>(hp.lr.get(), hp.beta1, hp.beta2, hp.eps, hp.weight_decay, *work.entry.step);
  const float scale = amp.grad_scale != nullptr ? *amp.grad_scale : 1.0f;
  R* __restrict__ param = static_cast<R*>(work.entry.slots[kParamSlot]) + work.offset;
  R* __restrict__ grad = static_cast<R*>(work.entry.slots[kGradSlot]) + work.offset;
  R* __restrict__ exp_avg = static_cast<R*>(work.entry.slots[kExpAvgSlot]) + work.offset;
  R* __restrict__ exp_avg_sq = static_cast<R*>(work.entry.slots[kExpAvgSqSlot]) + work.offset;
  R* __restrict__ max_exp_avg_sq = AMSGRAD ? static_cast<R*>(work.entry.slots[kMaxExpAvgSqSlot]) + work.offset : nullptr;

  int32_t scalar_begin = 0;
  if (work.entry.aligned) {
    constexpr int32_t kWidth = Vector<R>::kSize;
    const int32_t num_vectors = work.size / kWidth;
    for (int32_t v = thread; v < num_vectors; v += kBlockSize) {
      const int32_t i = v * kWidth;
      Vector<R> p = load_vector(param + i);
      Vector<R> g = load_vector(grad + i);
      Vector<R> m = load_vector(exp_avg + i);
      Vector<R> sq = load_vector(exp_avg_sq + i);
      Vector<R> sq_max{};
      if constexpr (AMSGRAD) {
        sq_max = load_vector(max_exp_avg_sq + i);
      }
      for (int k = 0; k < kWidth; ++k) {  // a constant trip count: unrolled (ptxas: no stack frame)
        adam_element<S, AMSGRAD, WD>(p.v[k], g.v[k], m.v[k], sq.v[k], sq_max.v[k], s, amp.grad_scale, scale,
                                            maximize);
      }
      store_vector(param + i, p);
      if (amp.grad_scale != nullptr) {
        store_vector(grad + i, g);
      }
      store_vector(exp_avg + i, m);
      store_vector(exp_avg_sq + i, sq);
      if constexpr (AMSGRAD) {
        store_vector(max_exp_avg_sq + i, sq_max);
      }
    }
    scalar_begin = num_vectors * kWidth;
  }
  // The tail after the last whole vector, or every element of a tensor with a misaligned slot.
  for (int32_t i = scalar_begin + thread; i < work.size; i += kBlockSize) {
    R unused = R(0);
    R& max_slot = AMSGRAD ? max_exp_avg_sq[i] : unused;
    adam_element<S, AMSGRAD, WD>(param[i], grad[i], exp_avg[i], exp_avg_sq[i], max_slot, s, amp.grad_scale,
                                        scale, maximize);
  }
}

// The kernel of a step (arguments.h's AdamKernel) on ``Launch`` (CudaLaunch, or the host
// emulation's HostLaunch), which provides ``template <S, AMSGRAD, WD> adam(table, num_blocks,
// groups, amp, maximize)``: the step counters advance, then one update launch per kMaxLaunchGroups groups.
template <typename Launch>
void adam_records(const StepTensors& tensors, const std::vector<AdamGroup>& groups, AdamOptions options,
                  const AmpArgs& amp) {
  const HostTables tables = build_tables(tensors.records, static_cast<int32_t>(groups.size()));
  Launch launch(tensors.device);
  dispatch_storage(tensors.dtype, "fused_adam_", [&](auto tag) {
    using S = decltype(tag);
    run_launches(launch, tables, amp, [&](const HostTables::Segment& segment, const LaunchTable& table) {
      AdamGroups launch_groups{};
      for (int32_t g = 0; g < segment.num_groups; ++g) {
        launch_groups.group[g] = groups[segment.first_group + g];
      }
      const int64_t blocks = segment.num_blocks;
      const bool maximize = options.maximize;
      constexpr WeightDecay kL2 = WeightDecay::kL2;
      constexpr WeightDecay kDecoupled = WeightDecay::kDecoupled;
      const bool decoupled = options.decay == kDecoupled;
      if (options.amsgrad) {
        decoupled ? launch.template adam<S, true, kDecoupled>(table, blocks, launch_groups, amp, maximize)
                  : launch.template adam<S, true, kL2>(table, blocks, launch_groups, amp, maximize);
      } else {
        decoupled ? launch.template adam<S, false, kDecoupled>(table, blocks, launch_groups, amp, maximize)
                  : launch.template adam<S, false, kL2>(table, blocks, launch_groups, amp, maximize);
      }
    });
  });
}

// fused_adam_ on ``Launch``'s device.
template <typename Launch>
void fused_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_sizes,
                at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors, bool amsgrad,
                bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  const ListCall call = adam_list_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                       group_sizes, hyper.size(), lr_tensors.size(), amsgrad,
                                       Launch::kDeviceType);
  run_adam(&adam_records<Launch>, call.tensors(), group_sizes, hyper, lr_tensors,
           adam_options(amsgrad, decoupled, maximize), grad_scale, found_inf);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps});
  if (grad_scale.has_value()) {
    bump_versions({grads});
  }
}

}  // namespace recap_kernels::cuda
