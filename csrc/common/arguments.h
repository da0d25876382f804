// The list ops' arguments (Note [Fused step ops] in ../ops.cpp), checked and turned into the
// records the kernels read (Note [Tensor records] in records.h). Shared by the CPU and CUDA
// kernels: both take the same lists and reject the same calls, each for its own device. Every
// check runs before the first byte is written, so a call that raises changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "recap_kernels/adam_math.h"
#include "recap_kernels/convert.h"
#include "records.h"

namespace recap_kernels {

// What a kernel of a device runs on: the records of a call or of a bound bucket, the element
// split of the CPU kernels, and the tensors' device and dtype (one of each per call).
struct StepTensors {
  const std::vector<TensorRecord>& records;
  const std::vector<int64_t>& starts;  // element_starts(records)
  c10::Device device;
  c10::ScalarType dtype;
};

// The switches of an Adam call that are one per call (compile-time switches of the kernels).
struct AdamOptions {
  bool amsgrad;
  WeightDecay decay;  // how a nonzero weight decay applies: kL2 (Adam) or kDecoupled (AdamW)
  bool maximize;
};

// The ops' ``decoupled`` flag (torch's ``decoupled_weight_decay``) as the kernels' WeightDecay.
inline AdamOptions adam_options(bool amsgrad, bool decoupled, bool maximize) {
  return AdamOptions{amsgrad, decoupled ? WeightDecay::kDecoupled : WeightDecay::kL2, maximize};
}

// The records of a list-op call, with the device and dtype of its tensors.
struct ListCall {
  std::vector<TensorRecord> records;
  std::vector<int64_t> starts;
  c10::Device device{c10::kCPU};
  c10::ScalarType dtype{c10::kFloat};

  StepTensors tensors() const { return StepTensors{records, starts, device, dtype}; }
};

// A named tensor list of a list op, in slot order (params, grads, then the state lists).
struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// Checks a list-op call and returns its records:
//   * every list has one tensor per parameter; group_sizes add up to the parameters;
//   * params: on ``device_type``, one device and one dtype per call (float32/float64/bfloat16/
//     float16), contiguous; every other tensor of a slot like its parameter (device, dtype,
//     element count, contiguous); each step counter a one-element float32 tensor on the
//     parameter's device.
ListCall list_call(const std::vector<NamedList>& slots, at::TensorList state_steps, at::IntArrayRef group_sizes,
                   c10::DeviceType device_type);

// The lists of fused_adam_ (max_exp_avg_sqs only with amsgrad) and fused_adagrad_, and the sizes of
// their per-group arguments (check_rows), checked first.
ListCall adam_list_call(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                        at::IntArrayRef group_sizes, size_t hyper_size, size_t lr_tensors_size, bool amsgrad,
                        c10::DeviceType device_type);
ListCall adagrad_list_call(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                           at::TensorList state_steps, at::IntArrayRef group_sizes, size_t hyper_size,
                           size_t lr_tensors_size, c10::DeviceType device_type);

// Note [Version counters]: the ops write tensors in place as torch's default path does, so they
// bump the version counter of every tensor they write (once per call), and autograd notices a
// parameter updated under a graph that saved it. Inference tensors raise here, as torch's
// in-place ops raise for them outside inference mode.
void bump_versions(std::initializer_list<at::TensorList> lists);

// Calls ``fn(tag)`` with the convert.h storage tag of ``dtype`` (float, double, BFloat16Storage,
// HalfStorage); the kernels take exactly these four dtypes.
template <typename Fn>
void dispatch_storage(c10::ScalarType dtype, const char* op, const Fn& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kDouble:
      return fn(double{});
    case at::kBFloat16:
      return fn(BFloat16Storage{});
    case at::kHalf:
      return fn(HalfStorage{});
    default:
      TORCH_CHECK(false, op, " takes float32, float64, bfloat16 or float16 tensors, not ", dtype);
  }
}

// The kernels of one optimizer family on one device: update every record (and advance the step
// counters, unless amp.skip()). Each device registers its own (cpu/*.cpp, cuda/*.cu).
using AdamKernel = void (*)(const StepTensors&, const std::vector<AdamGroup>&, AdamOptions, const AmpArgs&);
using AdagradKernel = void (*)(const StepTensors&, const std::vector<AdagradGroup>&, bool maximize, const AmpArgs&);

// One step of ``kernel`` with the call's hyperparameters (Note [Group hyperparameters]) and AMP tensors.
void run_adam(AdamKernel kernel, const StepTensors& tensors, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
              const c10::List<std::optional<at::Tensor>>& lr_tensors, AdamOptions options,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
void run_adagrad(AdagradKernel kernel, const StepTensors& tensors, at::IntArrayRef group_sizes,
                 at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

}  // namespace recap_kernels
