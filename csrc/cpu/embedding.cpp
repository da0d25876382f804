// recap_kernels::fused_sparse_adagrad_ and fused_rowwise_adagrad_ for CPU tensors (schemas and Note
// [Table ops] in ../ops.cpp): one call steps every embedding table of a bucket, across param groups,
// with the row math of recap_kernels/embedding_math.h. Registered for CPU and SparseCPU (Note [Table
// op dispatch]).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "../common/arguments.h"
#include "../common/tables.h"
#include "multi_tensor.h"
#include "recap_kernels/convert.h"
#include "recap_kernels/embedding_math.h"

namespace recap_kernels::cpu {
namespace {

template <typename S>
using raw_t = typename Storage<S>::raw_t;
template <typename S>
using math_t = typename Storage<S>::math_t;

// ------------------------------------------------------------------------------------------------
// Sorting a sparse gradient's entries by row
// ------------------------------------------------------------------------------------------------

// Note [Table row sort]
// A sparse gradient is uncoalesced: one entry per looked-up index, rows repeated and unsorted. The
// kernels sort its entries by row, without coalesce() and without touching anything table-sized: the
// key of entry k is (row << 32) | k, sorted by an LSD radix sort on the row bits only (as many passes
// of at most kDigitBits as the table's row count needs: two of 11 bits for 2M rows), which is stable,
// so a row's entries stay in their order and are summed in it. The histograms of every pass are
// counted in the pass that builds the keys. Then each distinct row is one run of consecutive keys,
// updated by one thread (no atomics, the sum of a row's entries is deterministic). Tables have up to
// 2^32 rows and gradients fewer than 2^32 entries. The scratch (two keys per entry, the run starts) is
// kept per thread between calls, so a step allocates nothing once the sizes settle.
constexpr int kDigitBits = 11;

struct SortedRows {
  std::vector<uint64_t> keys;     // (row << 32) | entry, by row
  std::vector<uint64_t> scratch;  // the radix sort's other buffer
  std::vector<int64_t> starts;    // distinct row u's keys are [starts[u], starts[u + 1])
  std::vector<int64_t> counts;    // the histograms, (1 << digit) per pass

  int64_t num_rows() const { return static_cast<int64_t>(starts.size()) - 1; }
};

void sort_rows(const Table& t, SortedRows& out) {
  const int64_t n = t.nnz;
  out.keys.resize(n);
  out.scratch.resize(n);
  const int bits = t.rows > 1 ? 64 - __builtin_clzll(static_cast<uint64_t>(t.rows - 1)) : 0;
  const int passes = (bits + kDigitBits - 1) / kDigitBits;
  const int digit = passes > 0 ? (bits + passes - 1) / passes : 0;
  const int64_t buckets = int64_t(1) << digit;
  const uint64_t mask = static_cast<uint64_t>(buckets - 1);
  out.counts.assign(static_cast<size_t>(passes * buckets), 0);
  uint64_t* keys = out.keys.data();
  int64_t* counts = out.counts.data();
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t row = static_cast<uint64_t>(t.indices[k * t.index_stride]);
    keys[k] = (row << 32) | static_cast<uint64_t>(k);
    for (int p = 0; p < passes; ++p) {
      ++counts[p * buckets + ((row >> (p * digit)) & mask)];
    }
  }
  uint64_t* src = keys;
  uint64_t* dst = out.scratch.data();
  for (int p = 0; p < passes; ++p) {
    int64_t* count = counts + p * buckets;
    int64_t sum = 0;
    for (int64_t b = 0; b < buckets; ++b) {  // exclusive prefix sums: each bucket's first slot
      const int64_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    const int shift = 32 + p * digit;
    for (int64_t k = 0; k < n; ++k) {
      const uint64_t key = src[k];
      dst[count[(key >> shift) & mask]++] = key;
    }
    std::swap(src, dst);
  }
  if (src != keys) {
    out.keys.swap(out.scratch);
  }
  out.starts.clear();
  const uint64_t* sorted = out.keys.data();
  for (int64_t k = 0; k < n; ++k) {
    if (k == 0 || (sorted[k] >> 32) != (sorted[k - 1] >> 32)) {
      out.starts.push_back(k);
    }
  }
  out.starts.push_back(n);
}

// ------------------------------------------------------------------------------------------------
// Row kernels
// ------------------------------------------------------------------------------------------------

// How many distinct rows ahead a thread prefetches a row's weights, accumulator and entries' values,
// and at most how many bytes of each: the rows are scattered over a table much larger than the
// caches, so each row waits on memory unless its lines are already on their way. Into L2 (prefetcht1):
// a row's dozen lines, eight rows ahead, are more misses than L1 tracks at once, and prefetches into L1
// stalled on it (on the 2-core EPYC of bench: about 15% slower than into L2).
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kPrefetchBytes = 512;

[[gnu::always_inline]] inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < std::min(bytes, kPrefetchBytes); off += 64) {
    __builtin_prefetch(c + off, 0, 2);
  }
}

// A gradient row into ``acc`` (math dtype), unscaled with UNSCALE (and stored back unscaled); ADD: added
// to what ``acc`` holds (a row's later entries), else assigned.
template <typename S, bool UNSCALE, bool ADD>
[[gnu::always_inline]] inline void load_grad(raw_t<S>* __restrict__ grad, math_t<S>* __restrict__ acc, int64_t dim,
                                             const math_t<S> grad_scale) {
  using St = Storage<S>;
  for (int64_t j = 0; j < dim; ++j) {
    math_t<S> g = St::load(grad[j]);
    if constexpr (UNSCALE) {
      g = unscale_grad(g, grad_scale);
      grad[j] = St::store(g);
    }
    if constexpr (ADD) {
      acc[j] = acc[j] + g;
    } else {
      acc[j] = g;
    }
  }
}

// Exact sparse Adagrad on one row whose summed gradient is ``acc``.
template <typename S>
[[gnu::always_inline]] inline void sparse_adagrad_row(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ state_sum,
                                                      const math_t<S>* __restrict__ acc, int64_t dim,
                                                      const AdagradScalars<math_t<S>>& s) {
  using St = Storage<S>;
  using M = math_t<S>;
  for (int64_t j = 0; j < dim; ++j) {
    M p = St::load(param[j]);
    M sum = St::load(state_sum[j]);
    sparse_adagrad_update<M>(p, acc[j], sum, s);
    param[j] = St::store(p);
    state_sum[j] = St::store(sum);
  }
}

// Lanes of the row-wise sum of squares: a fixed number of partial sums, so g++ vectorizes the reduction
// without reassociating anything (the order is the same on every instruction set).
constexpr int64_t kSumLanes = 16;

// Row-wise Adagrad on one row whose summed gradient is ``acc`` (overwritten with the update's gradient).
template <typename S, bool WEIGHT_DECAY>
[[gnu::always_inline]] inline void rowwise_row(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ state_sum,
                                               math_t<S>* __restrict__ acc, int64_t dim,
                                               const AdagradScalars<math_t<S>>& s) {
  using St = Storage<S>;
  using M = math_t<S>;
  M lanes[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= dim; j += kSumLanes) {
    for (int64_t l = 0; l < kSumLanes; ++l) {
      const M g = rowwise_grad<M, WEIGHT_DECAY>(acc[j + l], St::load(param[j + l]), s);
      acc[j + l] = g;
      lanes[l] = lanes[l] + g * g;
    }
  }
  for (int64_t l = 0; j < dim; ++j, ++l) {
    const M g = rowwise_grad<M, WEIGHT_DECAY>(acc[j], St::load(param[j]), s);
    acc[j] = g;
    lanes[l] = lanes[l] + g * g;
  }
  M sum_sq = M(0);
  for (int64_t l = 0; l < kSumLanes; ++l) {
    sum_sq = sum_sq + lanes[l];
  }
  M sum = St::load(state_sum[0]);
  const M multiplier = rowwise_multiplier<M>(sum, sum_sq, dim, s);
  state_sum[0] = St::store(sum);
  for (j = 0; j < dim; ++j) {
    param[j] = St::store(rowwise_update<M>(St::load(param[j]), acc[j], multiplier));
  }
}

// Distinct rows [begin, end) of a sorted sparse gradient (Note [Table row sort]): each row's entries
// summed into ``acc`` in entry order, then its update. Compiled per instruction set (Note [CPU
// instruction sets]); g++ vectorizes the loops over the row.
template <typename S, bool ROWWISE, bool WEIGHT_DECAY, bool UNSCALE>
RK_CPU_TARGET_CLONES void sparse_rows(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ state_sum,
                                      raw_t<S>* __restrict__ values, const uint64_t* __restrict__ keys,
                                      const int64_t* __restrict__ starts, int64_t dim, int64_t begin, int64_t end,
                                      int64_t num_rows, const AdagradScalars<math_t<S>> s, const math_t<S> grad_scale,
                                      math_t<S>* __restrict__ acc) {
  const int64_t sum_dim = ROWWISE ? 1 : dim;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(raw_t<S>));
  for (int64_t u = begin; u < end; ++u) {
    if (u + kPrefetchRows < num_rows) {  // the weights, accumulator and every entry of a row ahead
      const int64_t ahead = u + kPrefetchRows;
      const int64_t row = static_cast<int64_t>(keys[starts[ahead]] >> 32);
      prefetch_bytes(param + row * dim, row_bytes);
      prefetch_bytes(state_sum + row * sum_dim, sum_dim * static_cast<int64_t>(sizeof(raw_t<S>)));
      for (int64_t k = starts[ahead]; k < starts[ahead + 1]; ++k) {
        prefetch_bytes(values + static_cast<int64_t>(keys[k] & 0xffffffffu) * dim, row_bytes);
      }
    }
    const int64_t first = starts[u];
    const int64_t last = starts[u + 1];
    const int64_t row = static_cast<int64_t>(keys[first] >> 32);
    load_grad<S, UNSCALE, false>(values + static_cast<int64_t>(keys[first] & 0xffffffffu) * dim, acc, dim,
                                 grad_scale);
    for (int64_t k = first + 1; k < last; ++k) {
      load_grad<S, UNSCALE, true>(values + static_cast<int64_t>(keys[k] & 0xffffffffu) * dim, acc, dim,
                                  grad_scale);
    }
    if constexpr (ROWWISE) {
      rowwise_row<S, WEIGHT_DECAY>(param + row * dim, state_sum + row, acc, dim, s);
    } else {
      sparse_adagrad_row<S>(param + row * dim, state_sum + row * dim, acc, dim, s);
    }
  }
}

// Rows [begin, end) of a table with a dense gradient (row-wise Adagrad only).
template <typename S, bool WEIGHT_DECAY, bool UNSCALE>
RK_CPU_TARGET_CLONES void dense_rows(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ state_sum,
                                     raw_t<S>* __restrict__ grad, int64_t dim, int64_t begin, int64_t end,
                                     const AdagradScalars<math_t<S>> s, const math_t<S> grad_scale,
                                     math_t<S>* __restrict__ acc) {
  for (int64_t row = begin; row < end; ++row) {
    load_grad<S, UNSCALE, false>(grad + row * dim, acc, dim, grad_scale);
    rowwise_row<S, WEIGHT_DECAY>(param + row * dim, state_sum + row, acc, dim, s);
  }
}

// Note [Table work split]
// A table's rows (its distinct rows, for a sparse gradient) are cut into blocks of about kBlockWork
// elements, which the threads claim one after the other from a shared counter. The rows are scattered
// over a table far larger than the caches, so what a row costs depends on where it lies (a page already
// mapped, a line another row brought in) and the threads of a busy machine are preempted: with a static
// split, every thread waits for the slowest one at the end of the step; with blocks claimed as they go,
// a late thread holds the others up by one block at most. Nothing a row computes depends on which
// thread takes it, so the results are the same whatever the split (tests/test_embedding_ops.py). Below
// kParallelGrain elements the calling thread does it all, without a parallel region.
constexpr int64_t kBlockWork = 1 << 15;

// Calls ``worker(begin, end)`` on blocks covering [0, n), ``block`` items each, from as many threads as
// ``work`` (elements in all) calls for; each thread makes its worker (its scratch) once.
template <typename MakeWorker>
void for_blocks(int64_t n, int64_t block, int64_t work, const MakeWorker& make_worker) {
  const int64_t blocks = (n + block - 1) / block;
  const int64_t threads = work < kParallelGrain ? 1 : std::min<int64_t>(blocks, at::get_num_threads());
  if (threads <= 1) {
    auto worker = make_worker();
    worker(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed)) {
      worker(b * block, std::min(n, (b + 1) * block));
    }
  });
}

// One table's step (Note [Table work split]).
template <typename S, bool ROWWISE, bool WEIGHT_DECAY, bool UNSCALE>
void table_step(const Table& t, SortedRows& sorted, const AdagradScalars<math_t<S>>& s, math_t<S> grad_scale) {
  using M = math_t<S>;
  auto* param = static_cast<raw_t<S>*>(t.param);
  auto* state_sum = static_cast<raw_t<S>*>(t.state_sum);
  auto* grad = static_cast<raw_t<S>*>(t.grad);
  const int64_t dim = std::max<int64_t>(t.dim, 1);
  const int64_t block = std::max<int64_t>(16, kBlockWork / dim);
  if (!t.sparse) {
    for_blocks(t.rows, block, t.rows * dim, [&]() {
      return [&, acc = std::vector<M>(dim)](int64_t begin, int64_t end) mutable {
        dense_rows<S, WEIGHT_DECAY, UNSCALE>(param, state_sum, grad, t.dim, begin, end, s, grad_scale, acc.data());
      };
    });
    return;
  }
  if (t.nnz == 0) {
    return;
  }
  sort_rows(t, sorted);
  const int64_t num_rows = sorted.num_rows();
  const uint64_t* keys = sorted.keys.data();
  const int64_t* starts = sorted.starts.data();
  for_blocks(num_rows, block, (t.nnz + num_rows) * dim, [&]() {
    return [&, acc = std::vector<M>(dim)](int64_t begin, int64_t end) mutable {
      sparse_rows<S, ROWWISE, WEIGHT_DECAY, UNSCALE>(param, state_sum, grad, keys, starts, t.dim, begin, end, num_rows,
                                                     s, grad_scale, acc.data());
    };
  });
}

template <typename S, bool ROWWISE>
void table_step(const Table& t, SortedRows& sorted, const AdagradScalars<math_t<S>>& s, bool weight_decay,
                const float* scale) {
  const math_t<S> grad_scale = math_t<S>(scale != nullptr ? *scale : 1.0f);
  if (weight_decay) {
    return scale != nullptr ? table_step<S, ROWWISE, true, true>(t, sorted, s, grad_scale)
                            : table_step<S, ROWWISE, true, false>(t, sorted, s, grad_scale);
  }
  return scale != nullptr ? table_step<S, ROWWISE, false, true>(t, sorted, s, grad_scale)
                          : table_step<S, ROWWISE, false, false>(t, sorted, s, grad_scale);
}

// The op: checks, then every table in turn (each in parallel), then the step counters and versions.
void table_op(const char* op, bool rowwise, at::TensorList params, at::TensorList grads, at::TensorList state_sums,
              at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
              const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const std::vector<Table> tables = table_call(op, rowwise, c10::kCPU, params, grads, state_sums, state_steps,
                                               group_sizes, hyper, lr_tensors.size());
  if (tables.empty()) {
    return;
  }
  std::vector<at::Tensor> keep_alive;
  const std::vector<AdagradGroup> groups =
      adagrad_groups(hyper, lr_tensors, group_sizes.size(), params[0].device(), keep_alive);
  const AmpArgs amp = amp_args(grad_scale, found_inf, params[0].device());
  if (amp.skip()) {
    return;
  }
  static thread_local SortedRows sorted;
  for (const Table& t : tables) {
    const AdagradGroup& g = groups[t.group];
    dispatch_storage(t.dtype, op, [&](auto tag) {
      using S = decltype(tag);
      const auto s = table_scalars<math_t<S>>(g.lr.get(), g.lr_decay, g.eps, g.weight_decay,
                                              double(*t.step) + 1.0, maximize);
      if (rowwise) {
        table_step<S, true>(t, sorted, s, g.weight_decay != 0.0, amp.grad_scale);
      } else {
        table_step<S, false>(t, sorted, s, false, amp.grad_scale);
      }
    });
  }
  for (const Table& t : tables) {
    *t.step += 1.0f;
  }
  finish_table_call(tables, params, grads, state_sums, state_steps, amp.grad_scale != nullptr);
}

}  // namespace

// Note [Table op dispatch]
// The dispatcher picks a kernel from the dispatch keys of every tensor argument, the tensors of the
// lists included: a sparse COO gradient carries SparseCPU, which outranks CPU, so a call with sparse
// gradients goes to the SparseCPU kernel and one with dense gradients only (row-wise Adagrad) to the
// CPU kernel. Both are this one function.
TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("fused_sparse_adagrad_", &table_op_kernel<&table_op, false>);
  m.impl("fused_rowwise_adagrad_", &table_op_kernel<&table_op, true>);
}

TORCH_LIBRARY_IMPL(recap_kernels, SparseCPU, m) {
  m.impl("fused_sparse_adagrad_", &table_op_kernel<&table_op, false>);
  m.impl("fused_rowwise_adagrad_", &table_op_kernel<&table_op, true>);
}

}  // namespace recap_kernels::cpu
