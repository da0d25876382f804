// Every op of recap_kernels, declared once (the schemas); each device's sources register their
// kernels for it with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp, csrc/cuda/*.cu), and
// recap_kernels/_ops.py registers the fake kernels that torch.compile traces with. Also the class
// torch.classes.recap_kernels.BoundBucket (Note [Bound buckets] in common/bucket.h).
//
// Note [Fused step ops]
// One call updates every tensor of a bucket in place (trailing underscore, mutated lists marked
// (x!)), across param groups:
//   * the tensor lists are parallel, one entry per parameter; max_exp_avg_sqs is empty unless
//     amsgrad; state_steps are the 0-d float32 ``step`` tensors, advanced by the op;
//   * group_sizes splits the lists into param groups (consecutive spans); ``hyper`` holds one row
//     of hyperparameters per group and lr_tensors one optional Tensor lr per group (Note [Group
//     hyperparameters] in common/records.h);
//   * grad_scale / found_inf are GradScaler's: gradients are divided by grad_scale and stored back
//     unscaled; a nonzero found_inf makes the call change nothing, step counters included;
//   * every tensor written has its version counter bumped (Note [Version counters]).
//
// Note [Table ops]
// fused_sparse_adagrad_ / fused_rowwise_adagrad_ step embedding tables (recap_kernels/backends/_base.py,
// Note [Table steps]) with the arguments of fused_adagrad_ (hyper rows lr, lr_decay, eps, weight_decay):
//   * params are contiguous 2-D tables (rows, dim), float32/float64/bfloat16/float16;
//   * a gradient is a sparse COO tensor of whole rows (sparse_dim 1, dense_dim 1: int64 indices (1, nnz),
//     values (nnz, dim) in the table's dtype), uncoalesced as EmbeddingBag(sparse=True) makes it:
//     rows repeat, unsorted. Row-wise Adagrad also takes a dense contiguous gradient of the table's shape;
//   * state_sums: sparse Adagrad's are shaped as the table, row-wise Adagrad's (rows, 1), in its dtype;
//   * a sparse gradient's duplicate entries are summed per row in the math dtype (float, double for
//     float64 tables), never coalesced: the cost follows nnz, not the table (Note [Table row sort] in
//     cpu/embedding.cpp); only the rows present change, the others are left bit for bit;
//   * sparse Adagrad is torch.optim.Adagrad's sparse branch (weight_decay must be 0, as torch requires),
//     row-wise Adagrad is FBGEMM's EXACT_ROWWISE_ADAGRAD (recap_kernels/embedding_math.h);
//   * each table's step counter advances by one per call, an empty gradient (nnz 0) included;
//   * AMP as above: a sparse gradient's values are unscaled in place;
//   * every check (dtypes, devices, shapes, layouts, contiguity, list lengths, each row index within
//     its table: IndexError) runs before the first write, so a call that raises changes nothing.
#include <torch/custom_class.h>
#include <torch/library.h>

#include "common/bucket.h"

// Python.h only for the module's entry point; the limited API keeps the wheel abi3.
#include <Python.h>

extern "C" {
// ``import recap_kernels._C`` loads this library, which runs the static TORCH_LIBRARY
// registrations below; the module itself has no Python functions (everything is in torch.ops).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // docstring
      -1,       // no per-module state
      nullptr,  // no methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(recap_kernels, m) {
  m.def(
      "fused_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, int[] group_sizes, float[] hyper, "
      "Tensor?[] lr_tensors, *, bool amsgrad, bool decoupled, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "fused_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, Tensor(d!)[] state_steps, "
      "int[] group_sizes, float[] hyper, Tensor?[] lr_tensors, *, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // Note [Table ops]
  m.def(
      "fused_sparse_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, int[] group_sizes, float[] hyper, Tensor?[] lr_tensors, *, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "fused_rowwise_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, int[] group_sizes, float[] hyper, Tensor?[] lr_tensors, *, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Test-only, in builds with CUDA kernels: fused_adam_ / fused_adagrad_ on CPU tensors through the
  // CUDA kernels' block bodies, run on the host (cuda/emulate.cu; tests/test_cuda_ops.py).
  m.def(
      "_emulate_cuda_fused_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, int[] group_sizes, "
      "float[] hyper, Tensor?[] lr_tensors, *, bool amsgrad, bool decoupled, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "_emulate_cuda_fused_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, int[] group_sizes, float[] hyper, Tensor?[] lr_tensors, *, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Test-only, in builds with CUDA kernels: the table ops on CPU tensors through the CUDA kernels'
  // block bodies, run on the host (cuda/emulate.cu; tests/test_cuda_embedding.py).
  m.def(
      "_emulate_cuda_fused_sparse_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, int[] group_sizes, float[] hyper, Tensor?[] lr_tensors, *, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "_emulate_cuda_fused_rowwise_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, int[] group_sizes, float[] hyper, Tensor?[] lr_tensors, *, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Test-only: out = src, through convert.h's load and store (tests/test_math_edges.py).
  m.def("_convert_(Tensor(a!) out, Tensor src) -> ()");

  m.class_<recap_kernels::BoundBucket>("BoundBucket")
      .def(torch::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>, std::vector<at::Tensor>,
                       std::vector<int64_t>>())
      .def("gather", &recap_kernels::BoundBucket::gather)
      .def("change", &recap_kernels::BoundBucket::change)
      .def("addresses", &recap_kernels::BoundBucket::addresses)
      .def("grad_addresses", &recap_kernels::BoundBucket::grad_addresses)
      .def("finish_step", &recap_kernels::BoundBucket::finish_step)
      .def("adam_step", &recap_kernels::BoundBucket::adam_step)
      .def("adagrad_step", &recap_kernels::BoundBucket::adagrad_step)
      .def("set_emulate_cuda", &recap_kernels::BoundBucket::set_emulate_cuda)
      .def("__len__", &recap_kernels::BoundBucket::size);
}
