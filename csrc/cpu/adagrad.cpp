// recap_kernels::fused_adagrad_ for CPU tensors (schema in ../ops.cpp), and the CPU kernel of
// BoundBucket.adagrad_step: one call updates every tensor of a bucket, across param groups, with the
// update of recap_kernels/adagrad_math.h. Step counters and AMP as in adam.cpp.
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

// Elements [begin, end) of one piece of one tensor in the order of torch's loop LOOP (see
// adam_elements in adam.cpp).
template <typename S, bool WEIGHT_DECAY, bool UNSCALE, TorchCpuLoop LOOP>
[[gnu::always_inline]] inline void adagrad_elements(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad,
                                                    raw_t<S>* __restrict__ state_sum, int64_t begin, int64_t end,
                                                    const AdagradScalars<math_t<S>>& s, const math_t<S> grad_scale) {
  using St = Storage<S>;
  using M = math_t<S>;
  for (int64_t i = begin; i < end; ++i) {
    M p = St::load(param[i]);
    M g = St::load(grad[i]);
    if constexpr (UNSCALE) {
      g = unscale_grad(g, grad_scale);
      grad[i] = St::store(g);
    }
    M sum = St::load(state_sum[i]);
    adagrad_update<M, WEIGHT_DECAY, LOOP>(p, g, sum, s);
    param[i] = St::store(p);
    state_sum[i] = St::store(sum);
  }
}

// One piece of one tensor (see adam_span in adam.cpp). torch's AVX2 build computes its vector loop
// and its tail alike (Note [CPU Adagrad tail order]), so one loop does the whole piece.
template <typename S, bool WEIGHT_DECAY, bool UNSCALE>
RK_CPU_TARGET_CLONES void adagrad_span(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad,
                                       raw_t<S>* __restrict__ state_sum, int64_t n, const AdagradScalars<math_t<S>> s,
                                       const math_t<S> grad_scale) {
  adagrad_elements<S, WEIGHT_DECAY, UNSCALE, TorchCpuLoop::kVector>(param, grad, state_sum, 0, n, s, grad_scale);
}

// The same piece as torch's DEFAULT build computes it: no FMA, one (baseline) clone.
template <typename S, bool WEIGHT_DECAY, bool UNSCALE>
void adagrad_span_plain(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ grad, raw_t<S>* __restrict__ state_sum,
                        int64_t n, const AdagradScalars<math_t<S>> s, const math_t<S> grad_scale) {
  adagrad_elements<S, WEIGHT_DECAY, UNSCALE, TorchCpuLoop::kPlainVector>(param, grad, state_sum, 0, n, s,
                                                                         grad_scale);
}

template <typename S>
using AdagradSpanFn = void (*)(raw_t<S>*, raw_t<S>*, raw_t<S>*, int64_t, AdagradScalars<math_t<S>>, math_t<S>);

template <typename S, bool WEIGHT_DECAY, bool UNSCALE>
AdagradSpanFn<S> adagrad_span_fn(bool fma) {
  return fma ? &adagrad_span<S, WEIGHT_DECAY, UNSCALE> : &adagrad_span_plain<S, WEIGHT_DECAY, UNSCALE>;
}

template <typename S>
AdagradSpanFn<S> adagrad_span_fn(bool weight_decay, bool unscale, bool fma) {
  if (weight_decay) {
    return unscale ? adagrad_span_fn<S, true, true>(fma) : adagrad_span_fn<S, true, false>(fma);
  }
  return unscale ? adagrad_span_fn<S, false, true>(fma) : adagrad_span_fn<S, false, false>(fma);
}

template <typename S>
void adagrad_records(const StepTensors& tensors, const std::vector<AdagradGroup>& groups, bool maximize,
                     const float* scale) {
  using M = math_t<S>;
  const TorchCpuKernel& torch_kernel = torch_fused_adagrad_kernel();
  std::vector<AdagradSpanFn<S>> span_fns;
  for (const AdagradGroup& group : groups) {
    span_fns.push_back(adagrad_span_fn<S>(group.weight_decay != 0.0, scale != nullptr, torch_kernel.fma));
  }
  const M grad_scale = M(scale != nullptr ? *scale : 1.0f);
  const std::vector<TensorRecord>& records = tensors.records;
  parallel_over_elements(records, tensors.starts, 3, [&]() {
    return [&, last = LastScalars<AdagradScalars<M>>()](int64_t t, int64_t lo, int64_t hi) mutable {
      const TensorRecord& x = records[t];
      const AdagradGroup& g = groups[x.group];
      const AdagradScalars<M>& s = last.get(x.group, *x.step, [&] {
        return adagrad_scalars<M>(g.lr.get(), g.lr_decay, g.eps, g.weight_decay, double(*x.step) + 1.0, maximize,
                                  torch_kernel.fma);
      });
      auto slot = [&](Slot k) { return static_cast<raw_t<S>*>(x.slots[k]) + lo; };
      span_fns[x.group](slot(kParamSlot), slot(kGradSlot), slot(kStateSumSlot), hi - lo, s, grad_scale);
    };
  });
}

// The CPU kernel of fused_adagrad_ and of BoundBucket.adagrad_step (arguments.h's AdagradKernel).
void adagrad_cpu(const StepTensors& tensors, const std::vector<AdagradGroup>& groups, bool maximize,
                 const AmpArgs& amp) {
  if (amp.skip()) {
    return;
  }
  dispatch_storage(tensors.dtype, "fused_adagrad_", [&](auto tag) {
    adagrad_records<decltype(tag)>(tensors, groups, maximize, amp.grad_scale);
  });
  advance_steps(tensors.records);
}

void fused_adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
                       const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const ListCall call = adagrad_list_call(params, grads, state_sums, state_steps, group_sizes, hyper.size(),
                                          lr_tensors.size(), c10::kCPU);
  run_adagrad(&adagrad_cpu, call.tensors(), group_sizes, hyper, lr_tensors, maximize, grad_scale, found_inf);
  bump_versions({params, state_sums, state_steps});
  if (grad_scale.has_value()) {
    bump_versions({grads});
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("fused_adagrad_", &fused_adagrad_cpu);
  device_kernels(c10::kCPU).adagrad = &adagrad_cpu;  // BoundBucket.adagrad_step on CPU tensors
}

}  // namespace recap_kernels::cpu
