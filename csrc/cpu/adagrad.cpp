// recap_kernels::fused_adagrad_ for CPU tensors (schema in ../ops.cpp): one call updates every
// tensor of a bucket, across param groups, with the update of recap_kernels/adagrad_math.h.
// Argument layout, step counters and AMP as in adam.cpp.
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/bucket.h"
#include "multi_tensor.h"
#include "recap_kernels/adagrad_math.h"
#include "recap_kernels/convert.h"

namespace recap_kernels::cpu {
namespace {

template <typename S>
using raw_t = typename Storage<S>::raw_t;
template <typename S>
using math_t = typename Storage<S>::math_t;

// The element loop of one piece of one tensor (see adam_span in adam.cpp).
template <typename S, bool WEIGHT_DECAY, bool UNSCALE>
RK_CPU_TARGET_CLONES void adagrad_span(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad,
                                       raw_t<S>* __restrict__ state_sum, int64_t n, const AdagradScalars<math_t<S>> s,
                                       const math_t<S> grad_scale) {
  using St = Storage<S>;
  using M = math_t<S>;
  for (int64_t i = 0; i < n; ++i) {
    M p = St::load(param[i]);
    M g = St::load(grad[i]);
    if constexpr (UNSCALE) {
      g = unscale_grad(g, grad_scale);
      grad[i] = St::store(g);
    }
    M sum = St::load(state_sum[i]);
    adagrad_update<M, WEIGHT_DECAY>(p, g, sum, s);
    param[i] = St::store(p);
    state_sum[i] = St::store(sum);
  }
}

template <typename S>
using AdagradSpanFn = void (*)(raw_t<S>*, raw_t<S>*, raw_t<S>*, int64_t, AdagradScalars<math_t<S>>, math_t<S>);

template <typename S>
AdagradSpanFn<S> adagrad_span_fn(bool weight_decay, bool unscale) {
  if (weight_decay) {
    return unscale ? &adagrad_span<S, true, true> : &adagrad_span<S, true, false>;
  }
  return unscale ? &adagrad_span<S, false, true> : &adagrad_span<S, false, false>;
}

struct AdagradTensor {
  void* param;
  void* grad;
  void* state_sum;
  float* step;
  int32_t group;
};

struct AdagradGroup {
  double lr, lr_decay, eps, weight_decay;
};

template <typename S>
void adagrad_step(const std::vector<AdagradTensor>& tensors, const std::vector<int64_t>& starts,
                  const std::vector<AdagradGroup>& groups, bool maximize, std::optional<float> scale) {
  using M = math_t<S>;
  std::vector<AdagradSpanFn<S>> span_fns;
  for (const AdagradGroup& group : groups) {
    span_fns.push_back(adagrad_span_fn<S>(group.weight_decay != 0.0, scale.has_value()));
  }
  const M grad_scale = M(scale.value_or(1.0f));
  parallel_over_elements(starts, [&]() {
    return [&, last = LastScalars<AdagradScalars<M>>()](int64_t t, int64_t lo, int64_t hi) mutable {
      const AdagradTensor& x = tensors[t];
      const AdagradGroup& g = groups[x.group];
      const AdagradScalars<M>& s = last.get(x.group, *x.step, [&] {
        return adagrad_scalars<M>(g.lr, g.lr_decay, g.eps, g.weight_decay, double(*x.step) + 1.0, maximize);
      });
      span_fns[x.group](static_cast<raw_t<S>*>(x.param) + lo, static_cast<raw_t<S>*>(x.grad) + lo,
                        static_cast<raw_t<S>*>(x.state_sum) + lo, hi - lo, s, grad_scale);
    };
  });
}

void fused_adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> lrs,
                       const c10::List<std::optional<at::Tensor>>& lr_tensors, at::ArrayRef<double> lr_decays,
                       at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  const size_t num_groups = group_sizes.size();
  const std::vector<int32_t> tensor_group =
      check_adagrad_lists(params, grads, state_sums, state_steps, group_sizes, lrs, lr_decays, epss, weight_decays);
  const std::vector<double> lr_values = group_learning_rates(lrs, lr_tensors);
  const std::optional<float> scale = loss_scale(grad_scale);
  if (n == 0 || step_is_skipped(found_inf)) {
    return;
  }

  std::vector<AdagradGroup> groups(num_groups);
  for (size_t g = 0; g < num_groups; ++g) {
    groups[g] = AdagradGroup{lr_values[g], lr_decays[g], epss[g], weight_decays[g]};
  }
  const c10::ScalarType dtype = params[0].scalar_type();
  std::vector<AdagradTensor> tensors(n);
  std::vector<int64_t> starts(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(i, p, params[0], c10::kCPU);
    check_like_param("grads", i, grads[i], p);
    check_like_param("state_sums", i, state_sums[i], p);
    tensors[i] = AdagradTensor{p.data_ptr(), grads[i].data_ptr(), state_sums[i].data_ptr(),
                               step_pointer(i, state_steps[i], p), tensor_group[i]};
    starts[i + 1] = starts[i] + p.numel();
  }

  dispatch_storage(dtype, "fused_adagrad_", [&](auto tag) {
    adagrad_step<decltype(tag)>(tensors, starts, groups, maximize, scale);
  });
  advance_steps(tensors);
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("fused_adagrad_", &fused_adagrad_cpu);
  register_bound_bucket_class();  // its signature names the class
  m.impl("fused_adagrad_bucket_", &fused_adagrad_bucket<&fused_adagrad_cpu>);
}

}  // namespace recap_kernels::cpu
