// The table ops' arguments (Note [Table ops] in ../ops.cpp), checked, for the CPU kernels
// (cpu/embedding.cpp) and the CUDA ones (cuda/embedding.cuh): both take the same lists and reject the
// same calls, each for its own device. Every check runs before the first write, so a call that raises
// changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace recap_kernels {

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
  void* grad;              // a dense gradient (rows, dim), or a sparse one's values (nnz, dim), contiguous
  at::Tensor row_indices;  // a sparse gradient's row indices (nnz), int64, maybe strided
  const int64_t* indices;  // their data, ``index_stride`` apart
  int64_t index_stride;
  int64_t nnz;
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

// After the kernels: the unscaled values of gradients that were copied to be contiguous, back where
// the gradient keeps them; and the version counters of everything written (Note [Version counters]).
void finish_table_call(const std::vector<Table>& tables, at::TensorList params, at::TensorList grads,
                       at::TensorList state_sums, at::TensorList state_steps, bool unscaled);

}  // namespace recap_kernels
