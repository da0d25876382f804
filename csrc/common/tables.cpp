#include "tables.h"

// torch's operator headers have unused parameters (-Werror here).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#pragma GCC diagnostic pop
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

#include "arguments.h"
#include "records.h"

namespace recap_kernels {
namespace {

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

// The lowest and highest row index of a sparse gradient: a scan of host memory, or aminmax on the
// device and one copy to the host.
std::pair<int64_t, int64_t> index_range(const Table& t) {
  if (t.row_indices.device().is_cpu()) {
    int64_t low = t.indices[0];
    int64_t high = low;
    for (int64_t k = 1; k < t.nnz; ++k) {
      const int64_t row = t.indices[k * t.index_stride];
      low = std::min(low, row);
      high = std::max(high, row);
    }
    return {low, high};
  }
  const auto [low, high] = at::aminmax(t.row_indices);
  const at::Tensor both = at::stack({low, high}).cpu();
  return {both.const_data_ptr<int64_t>()[0], both.const_data_ptr<int64_t>()[1]};
}

// A sparse gradient: COO of whole rows (sparse_dim 1, dense_dim 1), its row indices within the table.
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
  t.row_indices = indices[0];
  t.indices = t.row_indices.const_data_ptr<int64_t>();
  t.index_stride = t.row_indices.stride(0);
  if (t.nnz > 0) {
    const auto [low, high] = index_range(t);
    TORCH_CHECK_INDEX(low >= 0 && high < t.rows, op, ": grads[", i, "], a sparse gradient of a table of ", t.rows,
                      " rows, has row indices from ", low, " to ", high, ": out of range");
  }
  t.values = values;
  if (!values.is_contiguous()) {
    t.values_copy = values.contiguous();
    values = t.values_copy;
  }
  t.grad = values.data_ptr();
}

}  // namespace

std::vector<Table> table_call(const char* op, bool rowwise, c10::DeviceType device_type, at::TensorList params,
                              at::TensorList grads, at::TensorList state_sums, at::TensorList state_steps,
                              at::IntArrayRef group_sizes, at::ArrayRef<double> hyper, size_t lr_tensors_size) {
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
    TORCH_CHECK(p.device().type() == device_type, op, ": params[", i, "] must be a ", c10::DeviceTypeName(device_type),
                " tensor, got one on ", p.device());
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(), " but params[0] on ",
                params[0].device());
    TORCH_CHECK(is_table_dtype(p.scalar_type()), op, ": params[", i,
                "] must be float32, float64, bfloat16 or float16, not ", p.scalar_type());
    TORCH_CHECK(p.dim() == 2, op, ": params[", i, "] must be a 2-D table (rows, dim), got shape ", p.sizes());
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    t.param = p.data_ptr();
    t.rows = p.size(0);
    t.dim = p.size(1);
    t.group = groups[i];
    t.dtype = p.scalar_type();
    t.nnz = 0;
    t.indices = nullptr;
    t.index_stride = 0;
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

void finish_table_call(const std::vector<Table>& tables, at::TensorList params, at::TensorList grads,
                       at::TensorList state_sums, at::TensorList state_steps, bool unscaled) {
  for (const Table& t : tables) {
    if (unscaled && t.values_copy.defined()) {
      t.values.copy_(t.values_copy);  // the unscaled values, back where the gradient keeps them
    }
  }
  bump_versions({params, state_sums, state_steps});
  if (unscaled) {
    bump_versions({grads});
    for (const Table& t : tables) {
      if (t.sparse) {
        t.values.unsafeGetTensorImpl()->bump_version();
      }
    }
  }
}

}  // namespace recap_kernels
