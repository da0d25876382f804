// The table ops' arguments (Note [Table ops] in ../ops.cpp), checked, for the CPU kernels
// (cpu/embedding.cpp) and the CUDA ones (cuda/embedding.cuh): both take the same lists and reject the
// same calls, each for its own device. Every check runs before the first write, so a call that raises
// changes nothing.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace recap_kernels {

// One table of a call, checked: what its kernel reads.
struct Table {
  void* param = nullptr;      // (rows, dim), contiguous
  void* state_sum = nullptr;  // sparse Adagrad: (rows, dim); row-wise: (rows, 1)
  float* step = nullptr;
  int64_t rows = 0;
  int64_t dim = 0;
  int32_t group = 0;
  c10::ScalarType dtype = c10::kFloat;
  bool sparse = false;
  void* grad = nullptr;              // a dense gradient (rows, dim), or a sparse one's values (nnz, dim), contiguous
  at::Tensor row_indices;            // a sparse gradient's row indices (nnz), int64, maybe strided
  const int64_t* indices = nullptr;  // their data, ``index_stride`` apart
  int64_t index_stride = 1;
  int64_t nnz = 0;
  at::Tensor values;       // a sparse gradient's values as the op was given them
  at::Tensor values_copy;  // their contiguous copy, when they were not contiguous (written back if unscaled)
};

// The tables of a call on ``device_type``, checked; ``rowwise``: fused_rowwise_adagrad_ (dense
// gradients allowed, sums of shape (rows, 1)), else fused_sparse_adagrad_ (weight_decay 0). Every
// sparse gradient's row indices are checked against its table (IndexError): a scan on the CPU, one
// aminmax and one host sync per call on a GPU.
std::vector<Table> table_call(const char* op, bool rowwise, c10::DeviceType device_type, at::TensorList params,
                              at::TensorList grads, at::TensorList state_sums, at::TensorList state_steps,
                              at::IntArrayRef group_sizes, at::ArrayRef<double> hyper, size_t lr_tensors_size);

// A device's table op: ``op`` (the schema's name, for messages), ``rowwise``, then the schema's arguments.
using TableOp = void (*)(const char* op, bool rowwise, at::TensorList params, at::TensorList grads,
                         at::TensorList state_sums, at::TensorList state_steps, at::IntArrayRef group_sizes,
                         at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                         bool maximize, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf);

// The kernel a device registers for fused_sparse_adagrad_ (ROWWISE false) or fused_rowwise_adagrad_
// (true): the schema's arguments, passed to its TableOp.
template <TableOp OP, bool ROWWISE>
void table_op_kernel(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                     at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
                     const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  OP(ROWWISE ? "fused_rowwise_adagrad_" : "fused_sparse_adagrad_", ROWWISE, params, grads, state_sums, state_steps,
     group_sizes, hyper, lr_tensors, maximize, grad_scale, found_inf);
}

// After the kernels: the unscaled values of gradients that were copied to be contiguous, back where
// the gradient keeps them; and the version counters of everything written (Note [Version counters]).
void finish_table_call(const std::vector<Table>& tables, at::TensorList params, at::TensorList grads,
                       at::TensorList state_sums, at::TensorList state_steps, bool unscaled);

}  // namespace recap_kernels
