// recap_kernels::fused_adam_ for CPU tensors (schema in ../ops.cpp), and the CPU kernel of
// BoundBucket.adam_step: one call updates every tensor of a bucket, across param groups, with the
// update of recap_kernels/adam_math.h. Each tensor's bias corrections use its own step counter + 1;
// the counters are advanced after the update (not at all when found_inf is set).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/bucket.h"
#include "multi_tensor.h"
#include "recap_kernels/adam_math.h"
#include "recap_kernels/convert.h"

namespace recap_kernels::cpu {
namespace {

template <typename S>
using raw_t = typename Storage<S>::raw_t;
template <typename S>
using math_t = typename Storage<S>::math_t;

// Elements [begin, end) of one piece of one tensor in the order of torch's loop LOOP: loads widen to
// the math dtype, the update is adam_update, stores round once. ``grad_scale`` is used with UNSCALE
// only. Inlined into adam_span, whose instruction set it is compiled for.
template <typename S, bool AMSGRAD, WeightDecay WD, bool UNSCALE, TorchCpuLoop LOOP>
[[gnu::always_inline]] inline void adam_elements(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad,
                                                 raw_t<S>* __restrict__ exp_avg, raw_t<S>* __restrict__ exp_avg_sq,
                                                 raw_t<S>* __restrict__ max_exp_avg_sq, int64_t begin, int64_t end,
                                                 const AdamScalars<math_t<S>>& s, const math_t<S> grad_scale) {
  using St = Storage<S>;
  using M = math_t<S>;
  for (int64_t i = begin; i < end; ++i) {
    M p = St::load(param[i]);
    M g = St::load(grad[i]);
    if constexpr (UNSCALE) {
      g = unscale_grad(g, grad_scale);
      grad[i] = St::store(g);  // GradScaler expects unscaled gradients afterwards, as torch's fused step leaves them
    }
    M m = St::load(exp_avg[i]);
    M v = St::load(exp_avg_sq[i]);
    M v_max = M(0);
    if constexpr (AMSGRAD) {
      v_max = St::load(max_exp_avg_sq[i]);
    }
    adam_update<M, AMSGRAD, WD, LOOP>(p, g, m, v, v_max, s);
    param[i] = St::store(p);
    exp_avg[i] = St::store(m);
    exp_avg_sq[i] = St::store(v);
    if constexpr (AMSGRAD) {
      max_exp_avg_sq[i] = St::store(v_max);
    }
  }
}

// One piece of one tensor, n elements: the first n_vector in the order of torch's vector loop, the
// rest in the order of its scalar tail (Note [CPU tail order]), as torch's AVX2 build computes them.
// Compiled per instruction set (Note [CPU instruction sets]); g++ vectorizes the vector-order loop.
template <typename S, bool AMSGRAD, WeightDecay WD, bool UNSCALE>
RK_CPU_TARGET_CLONES void adam_span(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad,
                                    raw_t<S>* __restrict__ exp_avg, raw_t<S>* __restrict__ exp_avg_sq,
                                    raw_t<S>* __restrict__ max_exp_avg_sq, int64_t n_vector, int64_t n,
                                    const AdamScalars<math_t<S>> s, const math_t<S> grad_scale) {
  adam_elements<S, AMSGRAD, WD, UNSCALE, TorchCpuLoop::kVector>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, 0,
                                                                n_vector, s, grad_scale);
  adam_elements<S, AMSGRAD, WD, UNSCALE, TorchCpuLoop::kTail>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                                              n_vector, n, s, grad_scale);
}

// The same piece as torch's DEFAULT build computes it: no FMA anywhere, so the baseline instruction
// set (SSE2) has all it needs, and there is one clone.
template <typename S, bool AMSGRAD, WeightDecay WD, bool UNSCALE>
void adam_span_plain(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad, raw_t<S>* __restrict__ exp_avg,
                     raw_t<S>* __restrict__ exp_avg_sq, raw_t<S>* __restrict__ max_exp_avg_sq, int64_t n_vector,
                     int64_t n, const AdamScalars<math_t<S>> s, const math_t<S> grad_scale) {
  adam_elements<S, AMSGRAD, WD, UNSCALE, TorchCpuLoop::kPlainVector>(param, grad, exp_avg, exp_avg_sq,
                                                                     max_exp_avg_sq, 0, n_vector, s, grad_scale);
  adam_elements<S, AMSGRAD, WD, UNSCALE, TorchCpuLoop::kPlainTail>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                                                   n_vector, n, s, grad_scale);
}

template <typename S>
using AdamSpanFn = void (*)(raw_t<S>*, raw_t<S>*, raw_t<S>*, raw_t<S>*, raw_t<S>*, int64_t, int64_t,
                            AdamScalars<math_t<S>>, math_t<S>);

template <typename S, bool AMSGRAD, WeightDecay WD, bool UNSCALE>
AdamSpanFn<S> adam_span_fn(bool fma) {
  return fma ? &adam_span<S, AMSGRAD, WD, UNSCALE> : &adam_span_plain<S, AMSGRAD, WD, UNSCALE>;
}

template <typename S, bool AMSGRAD, bool UNSCALE>
AdamSpanFn<S> adam_span_fn(WeightDecay wd, bool fma) {
  switch (wd) {
    case WeightDecay::kL2:
      return adam_span_fn<S, AMSGRAD, WeightDecay::kL2, UNSCALE>(fma);
    case WeightDecay::kDecoupled:
      return adam_span_fn<S, AMSGRAD, WeightDecay::kDecoupled, UNSCALE>(fma);
    default:
      return adam_span_fn<S, AMSGRAD, WeightDecay::kNone, UNSCALE>(fma);
  }
}

template <typename S>
AdamSpanFn<S> adam_span_fn(bool amsgrad, bool unscale, WeightDecay wd, bool fma) {
  if (amsgrad) {
    return unscale ? adam_span_fn<S, true, true>(wd, fma) : adam_span_fn<S, true, false>(wd, fma);
  }
  return unscale ? adam_span_fn<S, false, true>(wd, fma) : adam_span_fn<S, false, false>(wd, fma);
}

// Every record's update (Note [CPU work split]), then the step counters.
template <typename S>
void adam_records(const StepTensors& tensors, const std::vector<AdamGroup>& groups, AdamOptions options,
                  const float* scale) {
  using M = math_t<S>;
  const TorchCpuKernel& torch_kernel = torch_fused_adam_kernel();
  std::vector<AdamSpanFn<S>> span_fns;
  for (const AdamGroup& group : groups) {
    // A weight decay of 0 is kNone, never "multiply by 0": inf/NaN parameters behave as in torch.
    const WeightDecay mode = group.weight_decay == 0.0 ? WeightDecay::kNone : options.decay;
    span_fns.push_back(adam_span_fn<S>(options.amsgrad, scale != nullptr, mode, torch_kernel.fma));
  }
  const M grad_scale = M(scale != nullptr ? *scale : 1.0f);
  const std::vector<TensorRecord>& records = tensors.records;
  parallel_over_elements(records, tensors.starts, options.amsgrad ? 5 : 4, [&]() {
    return [&, last = LastScalars<AdamScalars<M>>()](int64_t t, int64_t lo, int64_t hi) mutable {
      const TensorRecord& x = records[t];
      const AdamGroup& g = groups[x.group];
      const AdamScalars<M>& s = last.get(x.group, *x.step, [&] {
        return adam_scalars<M>(g.lr.get(), g.beta1, g.beta2, g.eps, g.weight_decay, double(*x.step) + 1.0,
                               options.maximize, torch_kernel.fma);
      });
      auto slot = [&](Slot k) { return static_cast<raw_t<S>*>(x.slots[k]) + lo; };
      // The tensor's last numel % W elements are torch's scalar tail (Note [CPU tail order]).
      const int64_t vector_end = torch_kernel.vector_elements(x.numel, sizeof(raw_t<S>));
      const int64_t n_vector = std::clamp<int64_t>(vector_end - lo, 0, hi - lo);
      span_fns[x.group](slot(kParamSlot), slot(kGradSlot), slot(kExpAvgSlot), slot(kExpAvgSqSlot),
                        options.amsgrad ? slot(kMaxExpAvgSqSlot) : nullptr, n_vector, hi - lo, s, grad_scale);
    };
  });
}

// The CPU kernel of fused_adam_ and of BoundBucket.adam_step (arguments.h's AdamKernel).
void adam_cpu(const StepTensors& tensors, const std::vector<AdamGroup>& groups, AdamOptions options,
              const AmpArgs& amp) {
  if (amp.skip()) {
    return;  // GradScaler found an inf/NaN: nothing changes, step counters included
  }
  dispatch_storage(tensors.dtype, "fused_adam_", [&](auto tag) {
    adam_records<decltype(tag)>(tensors, groups, options, amp.grad_scale);
  });
  advance_steps(tensors.records);
}

void fused_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_sizes,
                    at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors, bool amsgrad,
                    bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const ListCall call = adam_list_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                       group_sizes, hyper.size(), lr_tensors.size(), amsgrad, c10::kCPU);
  run_adam(&adam_cpu, call.tensors(), group_sizes, hyper, lr_tensors, adam_options(amsgrad, decoupled, maximize),
           grad_scale, found_inf);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps});
  if (grad_scale.has_value()) {
    bump_versions({grads});
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("fused_adam_", &fused_adam_cpu);
  device_kernels(c10::kCPU).adam = &adam_cpu;  // BoundBucket.adam_step on CPU tensors
}

}  // namespace recap_kernels::cpu
