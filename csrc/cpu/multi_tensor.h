// What the multi-tensor CPU kernels share: the split of a bucket's elements over threads, cached
// per-group scalars, and the run-time choice of instruction set.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/records.h"

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

// The build of torch's fused CPU kernel (Adam or Adagrad) that fused=True runs in this process
// (Note [torch's kernel builds] in torch_kernels.cpp): the CPU kernels follow its arithmetic, its vector
// loop over each tensor's first numel - numel % W elements and its scalar tail over the rest (Note
// [CPU tail order] in recap_kernels/adam_math.h). Decided once, when a kernel first runs.
struct TorchCpuKernel {
  bool fma;          // the AVX2 (or AVX-512) build: FMA instructions; DEFAULT: none
  int vector_bytes;  // bytes of one Vectorized<scalar_t>: W = vector_bytes / sizeof(scalar_t)

  // The elements of a tensor of ``numel`` elements of ``element_size`` bytes that the vector loop
  // updates; the scalar tail updates the rest.
  int64_t vector_elements(int64_t numel, int64_t element_size) const {
    const int64_t width = vector_bytes / element_size;
    return numel - numel % width;
  }
};
const TorchCpuKernel& torch_fused_adam_kernel();
const TorchCpuKernel& torch_fused_adagrad_kernel();

// After the update: every tensor's step counter advances by one (torch's fused layout).
inline void advance_steps(const std::vector<TensorRecord>& records) {
  for (const TensorRecord& record : records) {
    *record.step += 1.0f;
  }
}

}  // namespace recap_kernels::cpu
