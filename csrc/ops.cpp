// Every op of recap_kernels, declared once (the schemas); each device's sources register their
// kernels for it with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp, csrc/cuda/*.cu), and
// recap_kernels/_ops.py registers the fake kernels that torch.compile traces with.
//
// Note [Fused step ops]
// One call updates every tensor of a bucket in place (trailing underscore, mutated lists marked
// (x!)), across param groups:
//   * the tensor lists are parallel, one entry per parameter; max_exp_avg_sqs is empty unless
//     amsgrad; state_steps are the 0-d float32 ``step`` tensors, advanced by the op;
//   * group_sizes splits the lists into param groups (consecutive spans); every per-group list
//     (lrs, betas, ...) has one entry per group. A defined lr_tensors[g] is group g's Tensor lr
//     and replaces lrs[g] (read where the kernel runs, so no host sync on CUDA);
//   * grad_scale / found_inf are GradScaler's: gradients are divided by grad_scale and stored back
//     unscaled; a nonzero found_inf makes the call change nothing, step counters included.
// The *_bucket_ ops are the same steps with the lists that do not change between steps (params,
// state, state_steps, group_sizes) held in a BoundBucket built once (Note [Bound buckets] in
// common/bucket.h): eager mode only; torch.compile traces the list ops.
#include <torch/custom_class.h>
#include <torch/library.h>

#include "common/bucket.h"

// Python.h only for the module's entry point; the limited API keeps the wheel abi3.
#include <Python.h>

namespace recap_kernels {

void register_bound_bucket_class() {
  static const bool registered = [] {
    torch::class_<BoundBucket>("recap_kernels", "BoundBucket")
        .def(torch::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>, std::vector<at::Tensor>,
                         std::vector<int64_t>>())
        .def("__len__", &BoundBucket::size);
    return true;
  }();
  (void)registered;
}

}  // namespace recap_kernels

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
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, int[] group_sizes, float[] lrs, Tensor?[] lr_tensors, "
      "float[] beta1s, float[] beta2s, float[] epss, float[] weight_decays, *, bool amsgrad, bool decoupled, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "fused_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, Tensor(d!)[] state_steps, "
      "int[] group_sizes, float[] lrs, Tensor?[] lr_tensors, float[] lr_decays, float[] epss, float[] weight_decays, "
      "*, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The class torch.classes.recap_kernels.BoundBucket (common/bucket.h says why it is registered there).
  // The *_bucket_ ops mutate its tensors in place, which their schemas cannot say (the schema
  // language takes no alias annotation on a class): only the gradients are marked (a!). Eager
  // mode only (see Note [Bound buckets]).
  recap_kernels::register_bound_bucket_class();
  m.def(
      "fused_adam_bucket_(__torch__.torch.classes.recap_kernels.BoundBucket bucket, Tensor(a!)[] grads, "
      "float[] lrs, Tensor?[] lr_tensors, float[] beta1s, float[] beta2s, float[] epss, float[] weight_decays, *, "
      "bool amsgrad, bool decoupled, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "fused_adagrad_bucket_(__torch__.torch.classes.recap_kernels.BoundBucket bucket, Tensor(a!)[] grads, "
      "float[] lrs, Tensor?[] lr_tensors, float[] lr_decays, float[] epss, float[] weight_decays, *, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Test-only, in builds with CUDA kernels: fused_adam_ / fused_adagrad_ on CPU tensors through the
  // CUDA kernels' block bodies, run on the host (cuda/emulate.cu; tests/test_cuda_ops.py).
  m.def(
      "_emulate_cuda_fused_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, int[] group_sizes, "
      "float[] lrs, Tensor?[] lr_tensors, float[] beta1s, float[] beta2s, float[] epss, float[] weight_decays, *, "
      "bool amsgrad, bool decoupled, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "_emulate_cuda_fused_adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] state_steps, int[] group_sizes, float[] lrs, Tensor?[] lr_tensors, float[] lr_decays, "
      "float[] epss, float[] weight_decays, *, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Test-only: out = src, through convert.h's load and store (tests/test_math_edges.py).
  m.def("_convert_(Tensor(a!) out, Tensor src) -> ()");
}
