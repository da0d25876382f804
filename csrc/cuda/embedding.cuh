// recap_kernels::fused_sparse_adagrad_ and fused_rowwise_adagrad_ on the GPU (schemas and Note [Table
// ops] in ../ops.cpp): the block bodies and the op, written once for the CUDA kernels (embedding.cu)
// and the test-only host emulation (emulate.cu), with the row math of recap_kernels/embedding_math.h.
//
// Note [CUDA table steps]
// A sparse gradient's entries are sorted by row on the device (a stable at::sort of its row indices:
// no host sync, duplicates keep their order, so a row's entries are summed in entry order as on the
// CPU). One launch per table has one block per sorted entry: a block whose entry starts a run of equal
// rows owns that row (it sums the run's values, column by column, and updates the row); every other
// block returns at once. The grid is known from nnz on the host, so nothing waits on the device.
// Exact sparse Adagrad is elementwise once a column is summed: its threads never meet. Row-wise
// Adagrad needs the row's mean square: each thread sums the squares of its columns, a barrier, every
// thread adds the block's partial sums in the same order (so all agree on the multiplier bit for bit),
// a second barrier (every thread has read the old accumulator), then thread 0 stores the accumulator
// and every thread updates its columns, recomputing their gradient rather than keeping it. With a
// dense gradient (row-wise only) block b owns row b. Step counters are read by the kernels and advanced
// after the last table, on the device, unless found_inf says to skip. The row index check (Note [Table
// ops]) is the op's one host sync.
//
// The phases are separate functions of (block, thread), so the host emulation runs phase 1 for every
// thread of a block, then phase 2, then phase 3: what the barriers guarantee on the GPU.
#pragma once

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/arguments.h"
#include "../common/tables.h"
#include "multi_tensor.cuh"
#include "recap_kernels/embedding_math.h"

// A loop left rolled on the device: an iteration may call the IEEE division's slow path, and unrolled
// copies keep more values live across those calls (ptxas spilled them).
#if RK_DEVICE_CODE
#define RK_NO_UNROLL _Pragma("unroll 1")
#else
#define RK_NO_UNROLL
#endif

namespace recap_kernels::cuda {

constexpr int32_t kTableBlockSize = 128;

// One table's launch, as its kernel reads it (a kernel argument).
struct TableLaunch {
  void* param;
  void* state_sum;
  void* grad;                 // a sparse gradient's values (nnz, dim), or a dense gradient (rows, dim)
  const int64_t* sorted_rows;  // the sparse entries' rows in sorted order; null for a dense gradient
  const int64_t* order;        // the entry at each sorted position
  int64_t blocks;              // sorted entries, or rows for a dense gradient
  int64_t dim;
  const float* step;  // the counter before this call
  AdagradGroup group;
  AmpArgs amp;
  bool maximize;
};

// The entries (sorted positions [first, last)) of the row a block owns; empty for a block that owns none.
struct RowRun {
  int64_t row;
  int64_t first;
  int64_t last;

  RK_HOST_DEVICE bool empty() const { return first == last; }
};

RK_HOST_DEVICE RowRun row_run(const TableLaunch& t, int64_t block) {
  if (t.sorted_rows == nullptr) {
    return RowRun{block, block, block + 1};
  }
  const int64_t row = t.sorted_rows[block];
  if (block > 0 && t.sorted_rows[block - 1] == row) {
    return RowRun{row, 0, 0};
  }
  int64_t last = block + 1;
  while (last < t.blocks && t.sorted_rows[last] == row) {
    ++last;
  }
  return RowRun{row, block, last};
}

template <typename M>
RK_HOST_DEVICE AdagradScalars<M> launch_scalars(const TableLaunch& t) {
  return table_scalars<M>(t.group.lr.get(), t.group.lr_decay, t.group.eps, t.group.weight_decay,
                          double(*t.step) + 1.0, t.maximize);
}

// Column ``j`` of a row's gradient: its entries' values summed in entry order, each unscaled first
// (and, with STORE, stored back unscaled: the last read of that value in the step).
template <typename S, bool STORE>
RK_HOST_DEVICE typename Storage<S>::math_t run_grad(const TableLaunch& t, const RowRun& run, int64_t j) {
  using St = Storage<S>;
  using M = typename St::math_t;
  auto* grad = static_cast<typename St::raw_t*>(t.grad);
  M acc = M(0);
  RK_NO_UNROLL
  for (int64_t k = run.first; k < run.last; ++k) {
    const int64_t entry = t.sorted_rows == nullptr ? run.row : t.order[k];
    typename St::raw_t& raw = grad[entry * t.dim + j];
    M g = St::load(raw);
    if (t.amp.grad_scale != nullptr) {
      g = unscale_grad(g, M(*t.amp.grad_scale));
      if constexpr (STORE) {
        raw = St::store(g);
      }
    }
    acc = k == run.first ? g : acc + g;
  }
  return acc;
}

// Exact sparse Adagrad, thread ``thread`` of block ``block``: its columns of the block's row.
template <typename S>
RK_HOST_DEVICE void sparse_adagrad_block(const TableLaunch& t, int64_t block, int32_t thread) {
  using St = Storage<S>;
  using M = typename St::math_t;
  if (t.amp.skip()) {
    return;
  }
  const RowRun run = row_run(t, block);
  if (run.empty()) {
    return;
  }
  const AdagradScalars<M> s = launch_scalars<M>(t);
  auto* param = static_cast<typename St::raw_t*>(t.param) + run.row * t.dim;
  auto* state_sum = static_cast<typename St::raw_t*>(t.state_sum) + run.row * t.dim;
  RK_NO_UNROLL
  for (int64_t j = thread; j < t.dim; j += kTableBlockSize) {
    const M g = run_grad<S, true>(t, run, j);
    M p = St::load(param[j]);
    M sum = St::load(state_sum[j]);
    sparse_adagrad_update<M>(p, g, sum, s);
    param[j] = St::store(p);
    state_sum[j] = St::store(sum);
  }
}

// Row-wise Adagrad, phase 1: the sum of squares of the thread's columns of the row's update gradient.
template <typename S, bool WEIGHT_DECAY>
RK_HOST_DEVICE typename Storage<S>::math_t rowwise_partial(const TableLaunch& t, const RowRun& run,
                                                           const AdagradScalars<typename Storage<S>::math_t>& s,
                                                           int32_t thread) {
  using St = Storage<S>;
  using M = typename St::math_t;
  const auto* param = static_cast<const typename St::raw_t*>(t.param) + run.row * t.dim;
  M partial = M(0);
  RK_NO_UNROLL
  for (int64_t j = thread; j < t.dim; j += kTableBlockSize) {
    const M g = rowwise_grad<M, WEIGHT_DECAY>(run_grad<S, false>(t, run, j), St::load(param[j]), s);
    partial = partial + g * g;
  }
  return partial;
}

// Phase 2, the same on every thread: the row's new accumulator and its multiplier, from the partials
// in thread order.
template <typename M>
struct RowwiseRow {
  M state_sum;
  M multiplier;
};

template <typename S>
RK_HOST_DEVICE RowwiseRow<typename Storage<S>::math_t> rowwise_row(
    const TableLaunch& t, const RowRun& run, const AdagradScalars<typename Storage<S>::math_t>& s,
    const typename Storage<S>::math_t* partials) {
  using St = Storage<S>;
  using M = typename St::math_t;
  M sum_sq = partials[0];
  for (int32_t i = 1; i < kTableBlockSize; ++i) {
    sum_sq = sum_sq + partials[i];
  }
  M state_sum = St::load(static_cast<const typename St::raw_t*>(t.state_sum)[run.row]);
  const M multiplier = rowwise_multiplier<M>(state_sum, sum_sq, t.dim, s);
  return RowwiseRow<M>{state_sum, multiplier};
}

// Phase 3: the accumulator (thread 0) and the thread's columns of the row.
template <typename S, bool WEIGHT_DECAY>
RK_HOST_DEVICE void rowwise_apply(const TableLaunch& t, const RowRun& run,
                                  const AdagradScalars<typename Storage<S>::math_t>& s,
                                  const RowwiseRow<typename Storage<S>::math_t>& r, int32_t thread) {
  using St = Storage<S>;
  using M = typename St::math_t;
  if (thread == 0) {
    static_cast<typename St::raw_t*>(t.state_sum)[run.row] = St::store(r.state_sum);
  }
  auto* param = static_cast<typename St::raw_t*>(t.param) + run.row * t.dim;
  RK_NO_UNROLL
  for (int64_t j = thread; j < t.dim; j += kTableBlockSize) {
    const M p = St::load(param[j]);
    const M g = rowwise_grad<M, WEIGHT_DECAY>(run_grad<S, true>(t, run, j), p, s);
    param[j] = St::store(rowwise_update<M>(p, g, r.multiplier));
  }
}

// The op on ``Launch``, which provides ``Launch(device)``, ``kDeviceType`` and
// ``template <S> sparse_adagrad(const TableLaunch&)`` / ``template <S, WD> rowwise(const TableLaunch&)``.
template <typename Launch>
void table_op(const char* op, bool rowwise, at::TensorList params, at::TensorList grads, at::TensorList state_sums,
              at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
              const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const std::vector<Table> tables = table_call(op, rowwise, Launch::kDeviceType, params, grads, state_sums,
                                               state_steps, group_sizes, hyper, lr_tensors.size());
  if (tables.empty()) {
    return;
  }
  const at::Device device = params[0].device();
  Launch launch(device);
  std::vector<at::Tensor> keep_alive;
  const std::vector<AdagradGroup> groups = adagrad_groups(hyper, lr_tensors, group_sizes.size(), device, keep_alive);
  const AmpArgs amp = amp_args(grad_scale, found_inf, device);
  for (const Table& table : tables) {
    if (table.rows == 0 || table.dim == 0 || (table.sparse && table.nnz == 0)) {
      continue;
    }
    TableLaunch t{table.param, table.state_sum, table.grad, nullptr, nullptr, table.rows, table.dim, table.step,
                  groups[table.group], amp, maximize};
    at::Tensor sorted_rows;
    at::Tensor order;
    if (table.sparse) {
      std::tie(sorted_rows, order) = at::sort(table.row_indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      t.sorted_rows = sorted_rows.const_data_ptr<int64_t>();
      t.order = order.const_data_ptr<int64_t>();
      t.blocks = table.nnz;
    }
    dispatch_storage(table.dtype, op, [&](auto tag) {
      using S = decltype(tag);
      if (!rowwise) {
        launch.template sparse_adagrad<S>(t);
      } else if (t.group.weight_decay != 0.0) {
        launch.template rowwise<S, true>(t);
      } else {
        launch.template rowwise<S, false>(t);
      }
    });
  }
  // Every kernel has read its counter: advance them all, on the device, unless found_inf is set.
  std::vector<at::Tensor> steps(state_steps.begin(), state_steps.end());
  if (found_inf.has_value()) {
    at::_foreach_add_(steps, found_inf->reshape({}).eq(0).to(at::kFloat));
  } else {
    at::_foreach_add_(steps, 1.0);
  }
  finish_table_call(tables, params, grads, state_sums, state_steps, grad_scale.has_value());
}

}  // namespace recap_kernels::cuda
