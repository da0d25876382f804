// recap_kernels::fused_adam_ for CPU tensors (schema in ../ops.cpp): one call updates every
// tensor of a bucket, across param groups, with the update of recap_kernels/adam_math.h.
//
// Layout of a call: the tensor lists are parallel (params[i], grads[i], exp_avgs[i], ...), the
// tensors of group g are the group_sizes[g] consecutive entries after those of group g - 1, and
// each per-group list (lrs, beta1s, ...) has one entry per group. The step counters are 0-d
// float32 tensors, one per parameter; each tensor's bias corrections use its own counter + 1, and
// the counters are advanced after the update (not at all when found_inf is set).
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

// The element loop of one piece of one tensor. Compiled per instruction set (Note [CPU
// instruction sets]) and vectorized by g++: loads widen to the math dtype, the update is
// adam_update, stores round once. ``grad_scale`` is used with UNSCALE only.
template <typename S, bool AMSGRAD, WeightDecay WD, bool UNSCALE>
RK_CPU_TARGET_CLONES void adam_span(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad,
                                    raw_t<S>* __restrict__ exp_avg, raw_t<S>* __restrict__ exp_avg_sq,
                                    raw_t<S>* __restrict__ max_exp_avg_sq, int64_t n,
                                    const AdamScalars<math_t<S>> s, const math_t<S> grad_scale) {
  using St = Storage<S>;
  using M = math_t<S>;
  for (int64_t i = 0; i < n; ++i) {
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
    adam_update<M, AMSGRAD, WD>(p, g, m, v, v_max, s);
    param[i] = St::store(p);
    exp_avg[i] = St::store(m);
    exp_avg_sq[i] = St::store(v);
    if constexpr (AMSGRAD) {
      max_exp_avg_sq[i] = St::store(v_max);
    }
  }
}

template <typename S>
using AdamSpanFn = void (*)(raw_t<S>*, raw_t<S>*, raw_t<S>*, raw_t<S>*, raw_t<S>*, int64_t, AdamScalars<math_t<S>>,
                            math_t<S>);

template <typename S, bool AMSGRAD, bool UNSCALE>
AdamSpanFn<S> adam_span_fn(WeightDecay wd) {
  switch (wd) {
    case WeightDecay::kL2:
      return &adam_span<S, AMSGRAD, WeightDecay::kL2, UNSCALE>;
    case WeightDecay::kDecoupled:
      return &adam_span<S, AMSGRAD, WeightDecay::kDecoupled, UNSCALE>;
    default:
      return &adam_span<S, AMSGRAD, WeightDecay::kNone, UNSCALE>;
  }
}

template <typename S>
AdamSpanFn<S> adam_span_fn(bool amsgrad, bool unscale, WeightDecay wd) {
  if (amsgrad) {
    return unscale ? adam_span_fn<S, true, true>(wd) : adam_span_fn<S, true, false>(wd);
  }
  return unscale ? adam_span_fn<S, false, true>(wd) : adam_span_fn<S, false, false>(wd);
}

struct AdamTensor {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* step;
  int32_t group;
};

struct AdamGroup {
  double lr, beta1, beta2, eps, weight_decay;
  WeightDecay mode;
};

template <typename S>
void adam_step(const std::vector<AdamTensor>& tensors, const std::vector<int64_t>& starts,
               const std::vector<AdamGroup>& groups, bool amsgrad, bool maximize, std::optional<float> scale) {
  using M = math_t<S>;
  std::vector<AdamSpanFn<S>> span_fns;
  for (const AdamGroup& group : groups) {
    span_fns.push_back(adam_span_fn<S>(amsgrad, scale.has_value(), group.mode));
  }
  const M grad_scale = M(scale.value_or(1.0f));
  parallel_over_elements(starts, [&]() {
    return [&, last = LastScalars<AdamScalars<M>>()](int64_t t, int64_t lo, int64_t hi) mutable {
      const AdamTensor& x = tensors[t];
      const AdamGroup& g = groups[x.group];
      const AdamScalars<M>& s = last.get(x.group, *x.step, [&] {
        return adam_scalars<M>(g.lr, g.beta1, g.beta2, g.eps, g.weight_decay, double(*x.step) + 1.0, maximize);
      });
      span_fns[x.group](static_cast<raw_t<S>*>(x.param) + lo, static_cast<raw_t<S>*>(x.grad) + lo,
                        static_cast<raw_t<S>*>(x.exp_avg) + lo, static_cast<raw_t<S>*>(x.exp_avg_sq) + lo,
                        amsgrad ? static_cast<raw_t<S>*>(x.max_exp_avg_sq) + lo : nullptr, hi - lo, s, grad_scale);
    };
  });
}

void fused_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_sizes,
                    at::ArrayRef<double> lrs, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                    at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                    at::ArrayRef<double> weight_decays, bool amsgrad, bool decoupled, bool maximize,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  const size_t num_groups = group_sizes.size();
  const std::vector<int32_t> tensor_group =
      check_adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, lrs, beta1s,
                       beta2s, epss, weight_decays, amsgrad);
  const std::vector<double> lr_values = group_learning_rates(lrs, lr_tensors);
  const std::optional<float> scale = loss_scale(grad_scale);
  if (n == 0 || step_is_skipped(found_inf)) {
    return;
  }

  std::vector<AdamGroup> groups(num_groups);
  for (size_t g = 0; g < num_groups; ++g) {
    const WeightDecay mode = weight_decays[g] == 0.0   ? WeightDecay::kNone
                             : decoupled ? WeightDecay::kDecoupled
                                         : WeightDecay::kL2;
    groups[g] = AdamGroup{lr_values[g], beta1s[g], beta2s[g], epss[g], weight_decays[g], mode};
  }
  const c10::ScalarType dtype = params[0].scalar_type();
  std::vector<AdamTensor> tensors(n);
  std::vector<int64_t> starts(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(i, p, params[0], c10::kCPU);
    check_like_param("grads", i, grads[i], p);
    check_like_param("exp_avgs", i, exp_avgs[i], p);
    check_like_param("exp_avg_sqs", i, exp_avg_sqs[i], p);
    if (amsgrad) {
      check_like_param("max_exp_avg_sqs", i, max_exp_avg_sqs[i], p);
    }
    tensors[i] = AdamTensor{p.data_ptr(),
                            grads[i].data_ptr(),
                            exp_avgs[i].data_ptr(),
                            exp_avg_sqs[i].data_ptr(),
                            amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                            step_pointer(i, state_steps[i], p),
                            tensor_group[i]};
    starts[i + 1] = starts[i] + p.numel();
  }

  dispatch_storage(dtype, "fused_adam_", [&](auto tag) {
    adam_step<decltype(tag)>(tensors, starts, groups, amsgrad, maximize, scale);
  });
  advance_steps(tensors);
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("fused_adam_", &fused_adam_cpu);
  register_bound_bucket_class();  // its signature names the class
  m.impl("fused_adam_bucket_", &fused_adam_bucket<&fused_adam_cpu>);
}

}  // namespace recap_kernels::cpu
