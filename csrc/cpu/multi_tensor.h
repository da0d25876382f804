// What the multi-tensor CPU kernels share: per-group hyperparameters, AMP scalars, the split
// of a bucket's elements over threads, and the run-time choice of instruction set.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/arguments.h"
#include "recap_kernels/convert.h"

// Note [CPU instruction sets]
// The wheel is built for baseline x86-64, and each element loop is compiled three times
// (AVX-512, AVX2 + FMA, baseline SSE2); the loader picks the best one this CPU supports
// (GNU ifunc, resolved once when the extension is loaded). So the kernels vectorize with
// 512-bit registers where there are some, without -march=native in the build.
// Elsewhere (aarch64) the loop is compiled once for the build's target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RK_CPU_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RK_CPU_TARGET_CLONES
#endif

namespace recap_kernels::cpu {

// Elements below which a bucket is updated by the calling thread alone: waking the other threads
// costs more than they would save on less data than this.
constexpr int64_t kParallelGrain = 1 << 16;

// Note [CPU work split]
// One op call updates every tensor of a bucket. Its elements are laid end to end (tensor t owns
// [starts[t], starts[t + 1])) and at::parallel_for hands each thread one equal share of that
// range, whatever the tensor sizes: a 16M-element tensor is split between the threads, and 5,000
// tensors of a few hundred elements are dealt out by element count, not by tensor count. Each
// thread makes one worker with ``make_worker()`` (per-thread state, such as cached scalars) and
// calls ``worker(t, begin, end)`` for each piece of a tensor in its share, in tensor order.
// Nothing is allocated and nothing is dispatched per tensor.
template <typename MakeWorker>
void parallel_over_elements(const std::vector<int64_t>& starts, const MakeWorker& make_worker) {
  const int64_t num_tensors = static_cast<int64_t>(starts.size()) - 1;
  if (num_tensors <= 0 || starts.back() == 0) {
    return;
  }
  at::parallel_for(0, starts.back(), kParallelGrain, [&](int64_t begin, int64_t end) {
    auto worker = make_worker();
    // The first tensor that ends after ``begin``; empty tensors own no element and are skipped.
    int64_t t = std::upper_bound(starts.begin() + 1, starts.end(), begin) - (starts.begin() + 1);
    for (; t < num_tensors && starts[t] < end; ++t) {
      const int64_t lo = std::max(begin, starts[t]);
      const int64_t hi = std::min(end, starts[t + 1]);
      if (lo < hi) {
        worker(t, lo - starts[t], hi - starts[t]);
      }
    }
  });
}

// Per thread: the scalars of the last (group, step) seen. Consecutive tensors nearly always share
// both, so the pow() calls of the bias corrections run a few times per call, not once per tensor.
template <typename Scalars>
class LastScalars {
 public:
  template <typename Compute>
  const Scalars& get(int32_t group, float step, const Compute& compute) {
    if (group != group_ || step != step_) {
      scalars_ = compute();
      group_ = group;
      step_ = step;
    }
    return scalars_;
  }

 private:
  int32_t group_ = -1;
  float step_ = -1.0f;  // step counters are >= 0
  Scalars scalars_{};
};

// After the update: every tensor's step counter advances by one (torch's fused layout).
template <typename TensorRecord>
void advance_steps(const std::vector<TensorRecord>& tensors) {
  for (const TensorRecord& x : tensors) {
    *x.step += 1.0f;
  }
}

// The learning rate of each group: the float, or the value of the group's Tensor lr.
inline std::vector<double> group_learning_rates(at::ArrayRef<double> lrs,
                                                const c10::List<std::optional<at::Tensor>>& lr_tensors) {
  TORCH_CHECK(lr_tensors.size() == lrs.size(), "lr_tensors must have one entry per group (", lrs.size(),
              "), got ", lr_tensors.size());
  std::vector<double> values(lrs.begin(), lrs.end());
  for (size_t i = 0; i < values.size(); ++i) {
    const std::optional<at::Tensor> lr = lr_tensors.get(i);
    if (lr.has_value() && lr->defined()) {
      check_lr_tensor(i, *lr);
      TORCH_CHECK(lr->is_cpu(), "lr_tensors[", i, "] must be a CPU tensor for the CPU kernels");
      values[i] = lr->item<double>();
    }
  }
  return values;
}

// AMP: whether found_inf says to skip this step, and the loss scale to divide out (if any).
inline bool step_is_skipped(const std::optional<at::Tensor>& found_inf) {
  const float* flag = amp_scalar("found_inf", found_inf, c10::Device(c10::kCPU));
  return flag != nullptr && *flag != 0.0f;
}

inline std::optional<float> loss_scale(const std::optional<at::Tensor>& grad_scale) {
  const float* scale = amp_scalar("grad_scale", grad_scale, c10::Device(c10::kCPU));
  return scale != nullptr ? std::optional<float>(*scale) : std::nullopt;
}

}  // namespace recap_kernels::cpu
