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

// Work below which a bucket is updated by the calling thread alone: waking the other threads costs
// more than they would save on less than this (2 threads, warm caches: 40 tensors of 1,000 fp32
// elements take 39 us on two threads against 47 on one; 20 of 500, 22 against 24).
constexpr int64_t kParallelGrain = 1 << 14;

// What one tensor costs beyond its elements (its record, step counter, scalars, a call, the first
// cache misses of each slot), in elements' worth of time: about 80 ns a tensor against 1-2 ns an fp32
// element on one thread. A bucket's work is its elements plus this much per tensor.
constexpr int64_t kTensorWork = 64;

// How many tensors ahead a thread prefetches a tensor's step counter and the first line of each of
// its slots (Note [CPU work split]).
constexpr int64_t kPrefetchTensors = 8;

// Note [CPU work split]
// One op call updates every tensor of a bucket in one parallel region. The bucket's tensors are laid
// end to end, each weighing its elements plus kTensorWork (what a tensor costs beyond its elements),
// and this work is cut into one chunk per thread, of equal work whatever the tensor sizes (the chunk
// table: chunk c is [c * work / chunks, (c + 1) * work / chunks), each boundary moved to the element
// it falls on, or to the start of the tensor when it falls on that tensor's fixed cost). So a
// 16M-element tensor is split between the threads, 5,000 tensors of a few hundred elements are dealt
// out by element count, and 5,000 one-element tensors by tensor count. Below kParallelGrain of work
// the calling thread does it all, without a parallel region. Each thread finds its chunk's first
// tensor by binary search, makes one worker with ``make_worker()`` (per-thread state, such as cached
// scalars) and calls ``worker(t, begin, end)`` for each piece of a tensor in its chunk, in tensor
// order. Nothing is allocated and nothing is dispatched per tensor. A tensor cut between two chunks
// gets a piece in each; the kernels compute every element the same way whichever piece it is in
// (Note [CPU tail order] in recap_kernels/adam_math.h for the elements of torch's scalar tail).
//
// Small tensors are scattered over memory (each slot and step counter its own allocation), so a
// bucket of thousands of them waits on memory latency, not bandwidth: the thread prefetches the step
// counter and the first cache line of each slot of the tensor kPrefetchTensors ahead. On 5,000
// one-element tensors that takes a third off the update (and a second thread another quarter); on
// 5,000 tensors of 1 to 3,000 elements, which the hardware prefetchers follow once a tensor's stream
// starts, it changes nothing measurable (bench/README.md).
template <typename MakeWorker>
void parallel_over_elements(const std::vector<TensorRecord>& records, const std::vector<int64_t>& starts,
                            int num_slots, const MakeWorker& make_worker) {
  const int64_t num_tensors = static_cast<int64_t>(starts.size()) - 1;
  const int64_t total = num_tensors > 0 ? starts.back() : 0;
  if (total == 0) {
    return;
  }
  const int64_t total_work = total + kTensorWork * num_tensors;
  const int64_t chunks =
      std::clamp<int64_t>((total_work + kParallelGrain - 1) / kParallelGrain, 1, at::get_num_threads());
  // Tensor t's work is [starts[t] + kTensorWork * t, that + kTensorWork + numel), its fixed cost first;
  // the bucket's element at work position w.
  auto element_at = [&](int64_t w) {
    int64_t lo = 0;
    int64_t hi = num_tensors;  // the last tensor whose work starts at or before w is in [lo, hi)
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      (starts[mid] + kTensorWork * mid <= w ? lo : hi) = mid;
    }
    const int64_t into = w - starts[lo] - kTensorWork * lo - kTensorWork;
    return starts[lo] + std::clamp<int64_t>(into, 0, starts[lo + 1] - starts[lo]);
  };
  auto boundary = [&](int64_t c) {
    return c == chunks ? total : element_at(total_work / chunks * c + std::min(c, total_work % chunks));
  };
  auto run_chunk = [&](int64_t c) {
    const int64_t begin = boundary(c);
    const int64_t end = boundary(c + 1);
    if (begin >= end) {
      return;
    }
    auto worker = make_worker();
    // The first tensor that ends after ``begin``, and one past the last that starts before ``end``;
    // empty tensors own no element and are skipped.
    int64_t t = std::upper_bound(starts.begin() + 1, starts.end(), begin) - (starts.begin() + 1);
    const int64_t stop = std::lower_bound(starts.begin(), starts.end(), end) - starts.begin();
    for (; t < stop; ++t) {
      if (t + kPrefetchTensors < stop) {  // prefetches never fault, a null slot included
        const TensorRecord& ahead = records[t + kPrefetchTensors];
        __builtin_prefetch(ahead.step);
        for (int k = 0; k < num_slots; ++k) {
          __builtin_prefetch(ahead.slots[k]);
        }
      }
      const int64_t lo = std::max(begin, starts[t]);
      const int64_t hi = std::min(end, starts[t + 1]);
      if (lo < hi) {
        worker(t, lo - starts[t], hi - starts[t]);
      }
    }
  };
  if (chunks == 1) {
    run_chunk(0);  // no parallel region at all
    return;
  }
  // One chunk per thread: at::parallel_for hands each of ``chunks`` threads one index.
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      run_chunk(c);
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
  // updates; the scalar tail updates the rest. W is a power of two: a mask, not a division per tensor.
  int64_t vector_elements(int64_t numel, int64_t element_size) const {
    const int64_t width = vector_bytes / element_size;
    return numel & ~(width - 1);
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
