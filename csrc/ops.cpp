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
