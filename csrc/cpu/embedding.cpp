// recap_kernels::fused_sparse_adagrad_ and fused_rowwise_adagrad_ for CPU tensors (schemas and Note
// [Table ops] in ../ops.cpp): one call steps every embedding table of a bucket, across param groups,
// with the row math of recap_kernels/embedding_math.h. Registered for CPU and SparseCPU (Note [Table
// op dispatch]).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "../common/arguments.h"
#include "multi_tensor.h"
#include "recap_kernels/convert.h"
#include "recap_kernels/embedding_math.h"

namespace recap_kernels::cpu {
namespace {

template <typename S>
using raw_t = typename Storage<S>::raw_t;
template <typename S>
using math_t = typename Storage<S>::math_t;

// One table of a call, checked: what its kernel reads.
struct Table {
  void* param;      // (rows, dim), contiguous
  void* state_sum;  // sparse Adagrad: (rows, dim); row-wise: (rows, 1)
  float* step;
  int64_t rows;
  int64_t dim;
  int32_t group;
  c10::ScalarType dtype;
  bool sparse;
  void* grad;                // a dense gradient (rows, dim), or a sparse one's values (nnz, dim), contiguous
  const int64_t* indices;    // a sparse gradient's row indices, ``index_stride`` apart
  int64_t index_stride;
  int64_t nnz;
  at::Tensor values;         // a sparse gradient's values as the op was given them
  at::Tensor values_copy;    // their contiguous copy, when they were not contiguous (written back if unscaled)
};

// ------------------------------------------------------------------------------------------------
// Checks (Note [Table ops]: all of them before the first write)
// ------------------------------------------------------------------------------------------------

bool is_table_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_dense_like(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Tensor& param,
                      at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == c10::kStrided, op, ": ", name, "[", i, "] must be a dense tensor, not ", t.layout());
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, "[", i, "] is on ", t.device(),
              " but its table is on ", param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              " but its table has ", param.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, "[", i, "] must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

// A sparse gradient: COO of whole rows (sparse_dim 1, dense_dim 1), its row indices within the table.
// A scan of its nnz indices: the range check is what makes an out-of-range index raise before any write.
void check_sparse_grad(const char* op, size_t i, const at::Tensor& grad, const at::Tensor& param, Table& t) {
  TORCH_CHECK(grad.device() == param.device(), op, ": grads[", i, "] is on ", grad.device(),
              " but its table is on ", param.device());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": grads[", i, "] has dtype ", grad.scalar_type(),
              " but its table has ", param.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grads[", i, "] has shape ", grad.sizes(), " but its table has ",
              param.sizes());
  TORCH_CHECK(grad.sparse_dim() == 1 && grad.dense_dim() == 1, op, ": grads[", i,
              "] must be a sparse gradient of whole rows (sparse_dim 1, dense_dim 1), got sparse_dim ",
              grad.sparse_dim(), " and dense_dim ", grad.dense_dim());
  const at::Tensor indices = grad._indices();
  at::Tensor values = grad._values();
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": grads[", i, "] must have int64 indices, not ",
              indices.scalar_type());
  t.nnz = indices.size(1);
  TORCH_CHECK(t.nnz < (int64_t(1) << 32) && t.rows <= (int64_t(1) << 32), op, ": grads[", i,
              "]: tables of up to 2^32 rows and gradients of under 2^32 entries (Note [Table row sort])");
  t.indices = indices.const_data_ptr<int64_t>();
  t.index_stride = indices.stride(1);
  int64_t low = 0;
  int64_t high = -1;
  if (t.nnz > 0) {
    low = high = t.indices[0];
    for (int64_t k = 1; k < t.nnz; ++k) {
      const int64_t row = t.indices[k * t.index_stride];
      low = std::min(low, row);
      high = std::max(high, row);
    }
  }
  TORCH_CHECK_INDEX(t.nnz == 0 || (low >= 0 && high < t.rows), op, ": grads[", i, "], a sparse gradient of a table of ",
                    t.rows, " rows, has row indices from ", low, " to ", high, ": out of range");
  t.values = values;
  if (!values.is_contiguous()) {
    t.values_copy = values.contiguous();
    values = t.values_copy;
  }
  t.grad = values.data_ptr();
}

// The tables of a call, checked; ``rowwise``: fused_rowwise_adagrad_ (dense gradients allowed, sums of
// shape (rows, 1)), else fused_sparse_adagrad_.
std::vector<Table> table_call(const char* op, bool rowwise, at::TensorList params, at::TensorList grads,
                              at::TensorList state_sums, at::TensorList state_steps, at::IntArrayRef group_sizes,
                              at::ArrayRef<double> hyper, size_t lr_tensors_size) {
  check_rows(hyper.size(), lr_tensors_size, group_sizes.size(), kAdagradFields, kAdagradLayout);
  const size_t n = params.size();
  for (const auto& [name, list] : {std::pair<const char*, at::TensorList>{"grads", grads},
                                   {"state_sums", state_sums},
                                   {"state_steps", state_steps}}) {
    TORCH_CHECK(list.size() == n, op, ": ", name, " must have one tensor per table (", n, "), got ", list.size());
  }
  std::vector<int32_t> groups;
  groups.reserve(n);
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0, op, ": group_sizes[", g, "] is negative");
    TORCH_CHECK(rowwise || hyper[g * kAdagradFields + 3] == 0.0, op,
                ": weight_decay must be 0 with sparse gradients (torch.optim.Adagrad rejects it), group ", g,
                " has ", hyper[g * kAdagradFields + 3]);
    groups.insert(groups.end(), group_sizes[g], static_cast<int32_t>(g));
  }
  TORCH_CHECK(groups.size() == n, op, ": group_sizes add up to ", groups.size(), " tables, but params has ", n);
  std::vector<Table> tables(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    Table& t = tables[i];
    TORCH_CHECK(p.defined() && p.layout() == c10::kStrided, op, ": params[", i, "] must be a dense tensor");
    TORCH_CHECK(p.device().type() == c10::kCPU, op, ": params[", i, "] must be a CPU tensor, got one on ",
                p.device());
    TORCH_CHECK(is_table_dtype(p.scalar_type()), op, ": params[", i,
                "] must be float32, float64, bfloat16 or float16, not ", p.scalar_type());
    TORCH_CHECK(p.dim() == 2, op, ": params[", i, "] must be a 2-D table (rows, dim), got shape ", p.sizes());
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    t.param = p.data_ptr();
    t.rows = p.size(0);
    t.dim = p.size(1);
    t.group = groups[i];
    t.dtype = p.scalar_type();
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    t.sparse = g.layout() == c10::kSparse;
    if (t.sparse) {
      check_sparse_grad(op, i, g, p, t);
    } else {
      TORCH_CHECK(rowwise, op, ": grads[", i, "] must be a sparse COO tensor, not ", g.layout());
      TORCH_CHECK(g.layout() == c10::kStrided, op, ": grads[", i, "] must be dense or sparse COO, not ", g.layout());
      check_dense_like(op, "grads", i, g, p, p.sizes());
      t.grad = g.data_ptr();
    }
    const std::vector<int64_t> sum_shape = rowwise ? std::vector<int64_t>{t.rows, 1} : p.sizes().vec();
    check_dense_like(op, "state_sums", i, state_sums[i], p, sum_shape);
    t.state_sum = state_sums[i].data_ptr();
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined() && step.device() == p.device() && step.scalar_type() == at::kFloat &&
                    step.numel() == 1,
                op, ": state_steps[", i, "] must be a one-element float32 tensor on ", p.device());
    t.step = step.data_ptr<float>();
  }
  return tables;
}

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

// How many distinct rows ahead a thread prefetches a row's weights and accumulator and its first
// entry's values, and at most how many bytes of each: the rows are scattered over a table much
// larger than the caches, so each row waits on memory unless its lines are on their way.
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kPrefetchBytes = 512;

[[gnu::always_inline]] inline void prefetch_bytes(const void* p, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < std::min(bytes, kPrefetchBytes); off += 64) {
    if (write) {
      __builtin_prefetch(c + off, 1);
    } else {
      __builtin_prefetch(c + off, 0);
    }
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
    if (u + kPrefetchRows < num_rows) {
      const uint64_t ahead = keys[starts[u + kPrefetchRows]];
      const int64_t row = static_cast<int64_t>(ahead >> 32);
      prefetch_bytes(param + row * dim, row_bytes, true);
      prefetch_bytes(state_sum + row * sum_dim, sum_dim * static_cast<int64_t>(sizeof(raw_t<S>)), true);
      prefetch_bytes(values + static_cast<int64_t>(ahead & 0xffffffffu) * dim, row_bytes, UNSCALE);
    }
    const int64_t first = starts[u];
    const int64_t last = starts[u + 1];
    const int64_t row = static_cast<int64_t>(keys[first] >> 32);
    load_grad<S, UNSCALE, false>(values + static_cast<int64_t>(keys[first] & 0xffffffffu) * dim, acc, dim,
                                 grad_scale);
    for (int64_t k = first + 1; k < last; ++k) {
      if (k + 1 < last) {
        prefetch_bytes(values + static_cast<int64_t>(keys[k + 1] & 0xffffffffu) * dim, row_bytes, UNSCALE);
      }
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

// Threads for ``work`` elements' worth of updates (Note [CPU work split]'s grain).
int64_t chunks_for(int64_t work) {
  return std::clamp<int64_t>((work + kParallelGrain - 1) / kParallelGrain, 1, at::get_num_threads());
}

// Runs ``body(c)`` for every chunk c < chunks: on the calling thread alone for one chunk.
template <typename Body>
void for_chunks(int64_t chunks, const Body& body) {
  if (chunks == 1) {
    body(0);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      body(c);
    }
  });
}

// One table's step: its rows in parallel, each thread a span of about equal work (a distinct row
// costs its entries plus one for its weights and accumulator).
template <typename S, bool ROWWISE, bool WEIGHT_DECAY, bool UNSCALE>
void table_step(const Table& t, SortedRows& sorted, const AdagradScalars<math_t<S>>& s, math_t<S> grad_scale) {
  using M = math_t<S>;
  auto* param = static_cast<raw_t<S>*>(t.param);
  auto* state_sum = static_cast<raw_t<S>*>(t.state_sum);
  auto* grad = static_cast<raw_t<S>*>(t.grad);
  if (t.rows == 0) {
    return;
  }
  if (!t.sparse) {
    const int64_t chunks = chunks_for(t.rows * t.dim);
    for_chunks(chunks, [&](int64_t c) {
      std::vector<M> acc(t.dim);
      dense_rows<S, WEIGHT_DECAY, UNSCALE>(param, state_sum, grad, t.dim, t.rows * c / chunks,
                                           t.rows * (c + 1) / chunks, s, grad_scale, acc.data());
    });
    return;
  }
  if (t.nnz == 0) {
    return;
  }
  sort_rows(t, sorted);
  const int64_t num_rows = sorted.num_rows();
  const int64_t* starts = sorted.starts.data();
  const int64_t total = t.nnz + num_rows;  // distinct row u's work starts at starts[u] + u
  const int64_t chunks = chunks_for(total * std::max<int64_t>(t.dim, 1));
  auto row_at = [&](int64_t c) {  // the first distinct row of chunk c
    if (c == chunks) {
      return num_rows;
    }
    const int64_t w = total * c / chunks;
    int64_t lo = 0;
    int64_t hi = num_rows;
    while (lo < hi) {  // the first u whose work starts at or after w
      const int64_t mid = lo + (hi - lo) / 2;
      if (starts[mid] + mid < w) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  };
  for_chunks(chunks, [&](int64_t c) {
    const int64_t begin = row_at(c);
    const int64_t end = row_at(c + 1);
    if (begin >= end) {
      return;
    }
    std::vector<M> acc(std::max<int64_t>(t.dim, 1));
    sparse_rows<S, ROWWISE, WEIGHT_DECAY, UNSCALE>(param, state_sum, grad, sorted.keys.data(), starts, t.dim, begin,
                                                   end, num_rows, s, grad_scale, acc.data());
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
  const std::vector<Table> tables =
      table_call(op, rowwise, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors.size());
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
    if (amp.grad_scale != nullptr && t.values_copy.defined()) {
      t.values.copy_(t.values_copy);  // the unscaled values, back where the gradient keeps them
    }
  }
  bump_versions({params, state_sums, state_steps});
  if (amp.grad_scale != nullptr) {
    bump_versions({grads});
    for (const Table& t : tables) {
      if (t.sparse) {
        t.values.unsafeGetTensorImpl()->bump_version();
      }
    }
  }
}

void fused_sparse_adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                              at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
                              const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  table_op("fused_sparse_adagrad_", false, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors,
           maximize, grad_scale, found_inf);
}

void fused_rowwise_adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                               at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
                               const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  table_op("fused_rowwise_adagrad_", true, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors,
           maximize, grad_scale, found_inf);
}

}  // namespace

// Note [Table op dispatch]
// The dispatcher picks a kernel from the dispatch keys of every tensor argument, the tensors of the
// lists included: a sparse COO gradient carries SparseCPU, which outranks CPU, so a call with sparse
// gradients goes to the SparseCPU kernel and one with dense gradients only (row-wise Adagrad) to the
// CPU kernel. Both are this one function.
TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("fused_sparse_adagrad_", &fused_sparse_adagrad_cpu);
  m.impl("fused_rowwise_adagrad_", &fused_rowwise_adagrad_cpu);
}

TORCH_LIBRARY_IMPL(recap_kernels, SparseCPU, m) {
  m.impl("fused_sparse_adagrad_", &fused_sparse_adagrad_cpu);
  m.impl("fused_rowwise_adagrad_", &fused_rowwise_adagrad_cpu);
}

}  // namespace recap_kernels::cpu
