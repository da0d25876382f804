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
// of at most kDigitBits as the table's row count needs: two of 11 bits for 2M rows). Each pass is
// parallel: the entries are cut into chunks; every chunk counts its digits (the first pass while it
// builds the keys), one thread turns the counts into each chunk's first slot per digit (digit-major,
// chunk-minor), and every chunk scatters its keys in order. So the sort is stable, a row's entries
// stay in their order and are summed in it, and the sorted keys are the same whatever the number of
// threads and chunks (the keys are distinct: their sorted order is unique). Then each distinct row is
// one run of consecutive keys, updated by one thread (no atomics, the sum of a row's entries is
// deterministic). Tables have up to 2^32 rows and gradients fewer than 2^32 entries. The scratch (two
// keys per entry, the counts) is kept per thread between calls, so a step allocates nothing once the
// sizes settle. The sort and the row updates run in one parallel region (Note [Table work split]); the
// threads wait for each other only between passes (Phase). On the 2-core EPYC of bench, 64k indices
// into 2M rows: the sort takes about 0.27 ms of the step on two threads, against 0.57 ms for the
// single-threaded sort it replaced.
constexpr int kDigitBits = 11;
// Chunks of a radix pass: at least this many entries each, and at most kChunksPerThread a thread (the
// counts are chunks x buckets, turned into offsets by one thread between passes).
constexpr int64_t kSortChunk = 2048;
constexpr int64_t kChunksPerThread = 2;

struct SortScratch {
  std::vector<uint64_t> keys;     // (row << 32) | entry, by row once sorted
  std::vector<uint64_t> scratch;  // the radix sort's other buffer
  std::vector<uint32_t> counts;   // a pass's counts, then first slots, chunk c's buckets at c * buckets
};

// One step of a parallel region: ``count`` tasks, each claimed by the first thread to ask, then
// ``last()`` once by the thread that finishes the last task; every thread returns once ``last`` is done.
// A thread waits only after every task has been claimed (by threads that are running them), so a region
// whose threads did not all start, or that runs on the calling thread alone, still gets through.
struct Phase {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> ready{false};

  template <typename Task, typename Last>
  void run(int64_t count, const Task& task, const Last& last) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      task(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) == count - 1) {  // sees every task's writes
        last();
        ready.store(true, std::memory_order_release);
      }
    }
    while (!ready.load(std::memory_order_acquire)) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
};

// A table's sort: its passes, its chunks, and the phases every thread of the region goes through.
class RowSort {
 public:
  RowSort(const Table& t, SortScratch& scratch, int64_t threads) : t_(t), s_(scratch) {
    n_ = t.nnz;
    const int bits = t.rows > 1 ? 64 - __builtin_clzll(static_cast<uint64_t>(t.rows - 1)) : 0;
    passes_ = (bits + kDigitBits - 1) / kDigitBits;
    digit_ = passes_ > 0 ? (bits + passes_ - 1) / passes_ : 0;
    buckets_ = int64_t(1) << digit_;
    chunks_ = std::clamp<int64_t>(n_ / kSortChunk, 1, kChunksPerThread * threads);
    s_.keys.resize(n_);
    s_.scratch.resize(n_);
    s_.counts.resize(static_cast<size_t>(chunks_ * buckets_));
  }

  // Called by every thread of the region; returns with the keys sorted (keys()).
  void sort() {
    uint64_t* src = s_.keys.data();
    uint64_t* dst = s_.scratch.data();
    build_.run(chunks_, [&](int64_t c) { build(c); }, [&] { offsets(); });
    for (int p = 0; p < passes_; ++p) {
      if (p > 0) {
        count_[p].run(chunks_, [&](int64_t c) { count(src, p, c); }, [&] { offsets(); });
      }
      scatter_[p].run(chunks_, [&](int64_t c) { scatter(src, dst, p, c); }, [] {});
      std::swap(src, dst);
    }
  }

  // The sorted keys (after sort()).
  const uint64_t* keys() const { return passes_ % 2 == 0 ? s_.keys.data() : s_.scratch.data(); }

 private:
  static constexpr int kMaxPasses = 3;  // 32 row bits in digits of kDigitBits

  int64_t chunk_begin(int64_t c) const { return c * n_ / chunks_; }
  int shift(int p) const { return 32 + p * digit_; }  // of pass p's digit in a key

  // The keys of chunk c, and the counts of their first digit. (Locals throughout: stores through a
  // uint64_t or uint32_t pointer may alias the members, which g++ would reload every entry.)
  void build(int64_t c) {
    const int64_t buckets = buckets_;
    const uint64_t mask = static_cast<uint64_t>(buckets - 1);
    uint32_t* count = s_.counts.data() + c * buckets;
    std::fill(count, count + buckets, 0u);
    uint64_t* __restrict__ keys = s_.keys.data();
    const int64_t* indices = t_.indices;
    const int64_t stride = t_.index_stride;
    for (int64_t k = chunk_begin(c), end = chunk_begin(c + 1); k < end; ++k) {
      const uint64_t row = static_cast<uint64_t>(indices[k * stride]);
      keys[k] = (row << 32) | static_cast<uint64_t>(k);
      ++count[row & mask];
    }
  }

  void count(const uint64_t* src, int p, int64_t c) {
    const int64_t buckets = buckets_;
    const uint64_t mask = static_cast<uint64_t>(buckets - 1);
    const int shift_p = shift(p);
    uint32_t* count = s_.counts.data() + c * buckets;
    std::fill(count, count + buckets, 0u);
    for (int64_t k = chunk_begin(c), end = chunk_begin(c + 1); k < end; ++k) {
      ++count[(src[k] >> shift_p) & mask];
    }
  }

  // The counts into each chunk's first slot per digit: digit-major, chunk-minor (a stable pass).
  void offsets() {
    const int64_t buckets = buckets_;
    const int64_t chunks = chunks_;
    uint32_t* counts = s_.counts.data();
    uint32_t sum = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        const uint32_t count = counts[c * buckets + b];
        counts[c * buckets + b] = sum;
        sum += count;
      }
    }
  }

  void scatter(const uint64_t* __restrict__ src, uint64_t* __restrict__ dst, int p, int64_t c) {
    const uint64_t mask = static_cast<uint64_t>(buckets_ - 1);
    const int shift_p = shift(p);
    uint32_t* __restrict__ slot = s_.counts.data() + c * buckets_;
    for (int64_t k = chunk_begin(c), end = chunk_begin(c + 1); k < end; ++k) {
      const uint64_t key = src[k];
      dst[slot[(key >> shift_p) & mask]++] = key;
    }
  }

  const Table& t_;
  SortScratch& s_;
  int64_t n_ = 0;
  int passes_ = 0;
  int digit_ = 0;
  int64_t buckets_ = 1;
  int64_t chunks_ = 1;
  Phase build_;
  Phase count_[kMaxPasses];
  Phase scatter_[kMaxPasses];
};

// ------------------------------------------------------------------------------------------------
// Row kernels
// ------------------------------------------------------------------------------------------------

// How many distinct rows ahead a thread prefetches a row's weights, accumulator and entries' values,
// and at most how many bytes of each: the rows are scattered over a table much larger than the
// caches, so each row waits on memory unless its lines are already on their way. Into L2 (prefetcht1):
// a row's dozen lines, eight rows ahead, are more misses than L1 tracks at once, and prefetches into L1
// stalled on it (on the 2-core EPYC of bench: about 15% slower than into L2). Four or sixteen rows
// ahead measured the same as eight there (2M x 64 fp32, 64k indices): the row updates are then bound
// by the memory system (a TLB miss per row and table on 4 KiB pages), not by how far ahead they ask.
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

// The distinct rows of a sorted sparse gradient (Note [Table row sort]) whose first entry is in [begin,
// end): each row's entries summed into ``acc`` in entry order, then its update. A cursor kPrefetchRows
// rows ahead prefetches each row's weights, accumulator and entries' values. Compiled per instruction
// set (Note [CPU instruction sets]); g++ vectorizes the loops over the row.
template <typename S, bool ROWWISE, bool WEIGHT_DECAY, bool UNSCALE>
RK_CPU_TARGET_CLONES void sparse_rows(raw_t<S>* __restrict__ param, raw_t<S>* __restrict__ state_sum,
                                      raw_t<S>* __restrict__ values, const uint64_t* __restrict__ keys, int64_t nnz,
                                      int64_t dim, int64_t begin, int64_t end, const AdagradScalars<math_t<S>> s,
                                      const math_t<S> grad_scale, math_t<S>* __restrict__ acc) {
  const int64_t sum_dim = ROWWISE ? 1 : dim;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(raw_t<S>));
  const auto row_of = [&](int64_t k) { return static_cast<int64_t>(keys[k] >> 32); };
  const auto entry_values = [&](int64_t k) { return values + static_cast<int64_t>(keys[k] & 0xffffffffu) * dim; };
  int64_t k = begin;
  while (k > 0 && k < end && row_of(k) == row_of(k - 1)) {  // the end of a row that started before
    ++k;
  }
  int64_t ahead = k;
  const auto prefetch_row = [&]() {  // the row at ``ahead``, and moves past it
    const int64_t row = row_of(ahead);
    prefetch_bytes(param + row * dim, row_bytes);
    prefetch_bytes(state_sum + row * sum_dim, sum_dim * static_cast<int64_t>(sizeof(raw_t<S>)));
    do {
      prefetch_bytes(entry_values(ahead), row_bytes);
    } while (++ahead < nnz && row_of(ahead) == row);
  };
  for (int64_t i = 0; i < kPrefetchRows && ahead < nnz; ++i) {
    prefetch_row();
  }
  while (k < end) {
    const int64_t row = row_of(k);
    load_grad<S, UNSCALE, false>(entry_values(k), acc, dim, grad_scale);
    for (++k; k < nnz && row_of(k) == row; ++k) {
      load_grad<S, UNSCALE, true>(entry_values(k), acc, dim, grad_scale);
    }
    if constexpr (ROWWISE) {
      rowwise_row<S, WEIGHT_DECAY>(param + row * dim, state_sum + row, acc, dim, s);
    } else {
      sparse_adagrad_row<S>(param + row * dim, state_sum + row * dim, acc, dim, s);
    }
    if (ahead < nnz) {
      prefetch_row();
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
// A table with a dense gradient has its rows cut into blocks of about kBlockWork elements; one with a
// sparse gradient has its sorted entries cut into pieces of about kBlockWork elements' worth, a piece
// updating the distinct rows whose first entry it holds (a row is never split). The threads claim
// blocks one after the other from a shared counter. The rows are scattered over a table far larger
// than the caches, so what a row costs depends on where it lies (a page already mapped, a line another
// row brought in) and the threads of a busy machine are preempted: with a static split, every thread
// waits for the slowest one at the end of the step; with blocks claimed as they go, a late thread holds
// the others up by one block at most. Nothing a row computes depends on which thread takes it, so the
// results are the same whatever the split (tests/test_embedding_ops.py). A sparse table's sort (Note
// [Table row sort]) runs in the same parallel region, just before its pieces: one wake-up of the
// threads a table. Below kParallelGrain elements the calling thread does it all, without a parallel
// region.
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
void table_step(const Table& t, SortScratch& scratch, const AdagradScalars<math_t<S>>& s, math_t<S> grad_scale) {
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
  // One region: the sort's phases, then pieces of ``block`` entries claimed as they go, each updating
  // the rows that start in it.
  const int64_t n = t.nnz;
  const int64_t pieces = (n + block - 1) / block;
  const int64_t threads = n * dim < kParallelGrain ? 1 : std::min<int64_t>(pieces, at::get_num_threads());
  RowSort sort(t, scratch, threads);
  std::atomic<int64_t> next{0};
  const auto work = [&](int64_t, int64_t) {
    sort.sort();
    const uint64_t* keys = sort.keys();
    std::vector<M> acc(dim);
    for (int64_t p = next.fetch_add(1, std::memory_order_relaxed); p < pieces;
         p = next.fetch_add(1, std::memory_order_relaxed)) {
      sparse_rows<S, ROWWISE, WEIGHT_DECAY, UNSCALE>(param, state_sum, grad, keys, n, t.dim, p * block,
                                                     std::min(n, (p + 1) * block), s, grad_scale, acc.data());
    }
  };
  if (threads <= 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, threads, 1, work);
  }
}

template <typename S, bool ROWWISE>
void table_step(const Table& t, SortScratch& scratch, const AdagradScalars<math_t<S>>& s, bool weight_decay,
                const float* scale) {
  const math_t<S> grad_scale = math_t<S>(scale != nullptr ? *scale : 1.0f);
  if (weight_decay) {
    return scale != nullptr ? table_step<S, ROWWISE, true, true>(t, scratch, s, grad_scale)
                            : table_step<S, ROWWISE, true, false>(t, scratch, s, grad_scale);
  }
  return scale != nullptr ? table_step<S, ROWWISE, false, true>(t, scratch, s, grad_scale)
                          : table_step<S, ROWWISE, false, false>(t, scratch, s, grad_scale);
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
  static thread_local SortScratch scratch;
  for (const Table& t : tables) {
    const AdagradGroup& g = groups[t.group];
    dispatch_storage(t.dtype, op, [&](auto tag) {
      using S = decltype(tag);
      const auto s = table_scalars<math_t<S>>(g.lr.get(), g.lr_decay, g.eps, g.weight_decay,
                                              double(*t.step) + 1.0, maximize);
      if (rowwise) {
        table_step<S, true>(t, scratch, s, g.weight_decay != 0.0, amp.grad_scale);
      } else {
        table_step<S, false>(t, scratch, s, false, amp.grad_scale);
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
