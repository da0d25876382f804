// recap_kernels::BoundBucket: a bucket of parameters held on the C++ side from one plan to the next
// (registered in ../ops.cpp as torch.classes.recap_kernels.BoundBucket).
//
// Note [Bound buckets]
// An optimizer step over 5,000 small tensors cannot afford per-tensor work in Python (about 1 µs a
// tensor) nor the conversion of Python lists of tensors into C++ at every call (about 160 ns a
// tensor a list). A BoundBucket is built once per plan from the parameter, state and step lists
// (recap_kernels/optim/_dispatch.py) and holds them; each step then costs a constant number of
// Python calls per bucket:
//   * gather() reads every parameter's ``.grad`` here, in C++ (the tensors are the Python objects'
//     own TensorImpls, so ``p.grad = g`` and ``p.data = x`` are seen), and checks that everything
//     the kernels will read is as it was when the plan was built: the same parameter, state and
//     step storage (addresses), dtype, shape and device, contiguous, and a dense contiguous
//     gradient of the parameter's dtype and shape. It returns 0, or a nonzero code and the reason
//     (change()) when anything differs: the optimizer then builds a new plan instead of trusting
//     this one (Note [Plan invalidation] in _dispatch.py). It reads and writes nothing else, so a
//     step whose second bucket changed has not written to its first.
//   * adam_step() / adagrad_step() run the device's kernels on the gathered records (the list ops'
//     kernels: same math, same results), advance the step counters and bump the version counters
//     of every tensor written (Note [Version counters] in arguments.h).
//   * The Triton backend reads addresses() (the pointer table of every slot) once per plan and
//     grad_addresses() after each gather(), re-uploading them only when they differ.
//
// Eager mode only: the tensors are hidden from the dispatcher inside the object, so torch.compile
// (and anything else that traces or functionalizes) cannot see their mutation; traced steps call
// the list ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <vector>

#include "arguments.h"
#include "records.h"

namespace recap_kernels {

class BoundBucket : public torch::CustomClassHolder {
 public:
  // ``states``: the state lists in slot order after the gradient (Adam: exp_avgs, exp_avg_sqs and,
  // with amsgrad, max_exp_avg_sqs; Adagrad: state_sums), each of one tensor per parameter.
  // Checked as the list ops check their lists; the gradients are read by gather().
  BoundBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
              std::vector<at::Tensor> state_steps, std::vector<int64_t> group_sizes);

  int64_t gather();
  std::string change() const { return change_; }
  at::Tensor addresses() const;
  at::Tensor grad_addresses() const { return grad_addresses_; }
  void finish_step(bool grads_written);
  int64_t size() const { return static_cast<int64_t>(params_.size()); }
  int64_t num_states() const { return static_cast<int64_t>(states_.size()); }

  void adam_step(std::vector<double> hyper, c10::List<std::optional<at::Tensor>> lr_tensors, bool amsgrad,
                 bool decoupled, bool maximize, std::optional<at::Tensor> grad_scale,
                 std::optional<at::Tensor> found_inf);
  void adagrad_step(std::vector<double> hyper, c10::List<std::optional<at::Tensor>> lr_tensors, bool maximize,
                    std::optional<at::Tensor> grad_scale, std::optional<at::Tensor> found_inf);

  // Test-only: run the CUDA kernels' block bodies on the host for this (CPU) bucket (cuda/emulate.cu).
  void set_emulate_cuda(bool emulate) { emulate_cuda_ = emulate; }

 private:
  StepTensors gathered(const char* op) const;
  // Checks parameter i against the plan and records its gradient's address; the reason when it differs.
  const char* check_and_gather(size_t i);
  int64_t changed(size_t i, const char* what);

  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> states_;
  std::vector<at::Tensor> steps_;
  std::vector<int64_t> group_sizes_;
  std::vector<TensorRecord> records_;  // gradient addresses as of the last gather()
  std::vector<int64_t> starts_;
  c10::Device device_{c10::kCPU};
  c10::ScalarType dtype_{c10::kFloat};
  caffe2::TypeMeta dtype_meta_;
  at::Tensor grad_addresses_;  // int64 [n] on the CPU
  int64_t* grad_address_data_ = nullptr;
  std::vector<bool> others_aligned_;  // every slot but the gradient is 16-byte aligned, per tensor
  bool gathered_ = false;             // gather() succeeded since the last step
  bool emulate_cuda_ = false;
  std::string change_;
};

// The kernels of each device, for the bound buckets: registered by the device's sources at load
// time (a build without CUDA has none for CUDA). ``emulated``: the test-only host emulation of the
// CUDA kernels, for CPU tensors.
struct DeviceKernels {
  AdamKernel adam = nullptr;
  AdagradKernel adagrad = nullptr;
};
DeviceKernels& device_kernels(c10::DeviceType device_type, bool emulated = false);

}  // namespace recap_kernels
