// What the kernels of both devices read about each tensor of a step, and each param group.
//
// Note [Tensor records]
// A step updates a bucket of tensors across param groups. The kernels read one TensorRecord per
// parameter: the addresses of its slots (the parameter, its gradient and its state tensors, named
// as torch's fused kernels name them), its step counter, its element count and its group. The CPU
// kernels walk the records; the CUDA kernels read them from device memory (multi_tensor.cuh), so a
// record is one 64-byte line. Records come from two places: the list ops build them from their
// arguments at each call (arguments.h), and a BoundBucket (bucket.h) builds them once per plan and
// refreshes only the gradient addresses at each step.
//
// Note [Group hyperparameters]
// The per-group hyperparameters reach every kernel in one format, built once per step by
// recap_kernels/backends/_base.py (``HyperRows``): ``hyper``, a flat list of ``kAdamFields`` (or
// ``kAdagradFields``) doubles per group, and ``lr_tensors``, one optional Tensor lr per group that
// replaces the row's lr. One Tensor-lr policy for every device (learning_rates below):
//   * a Tensor lr must have one element;
//   * on the parameters' device it is read where the kernel runs, at each step (fp32/fp64 in
//     place; another floating dtype is converted to fp64 first): no host sync on CUDA, so a step
//     can be captured in a CUDA graph and a scheduler may update the tensor in place;
//   * on the CPU for CUDA parameters it is read on the host (no device sync);
//   * anywhere else it is an error.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "recap_kernels/macros.h"

namespace recap_kernels {

// Slots of a TensorRecord, as torch's fused kernels name them (kParamIdx, kGradIdx, ...).
enum Slot : int32_t {
  kParamSlot = 0,
  kGradSlot = 1,
  kExpAvgSlot = 2,         // Adam
  kExpAvgSqSlot = 3,       // Adam
  kMaxExpAvgSqSlot = 4,    // Adam with amsgrad
  kStateSumSlot = 2,       // Adagrad
};
constexpr int kMaxSlots = 5;

struct alignas(16) TensorRecord {
  void* slots[kMaxSlots];  // by Slot; unused slots are null
  float* step;             // the 0-d float32 step counter
  int64_t numel;
  int32_t group;           // index of the tensor's param group in the call
  int32_t aligned;         // every slot is 16-byte aligned: the CUDA kernels may use 128-bit accesses
};
static_assert(sizeof(TensorRecord) == 64, "a TensorRecord is one 64-byte line");

// Prefix sums of the records' element counts: tensor t owns elements [starts[t], starts[t + 1]) of
// the bucket laid end to end (Note [CPU work split]).
inline std::vector<int64_t> element_starts(const std::vector<TensorRecord>& records) {
  std::vector<int64_t> starts(records.size() + 1, 0);
  for (size_t i = 0; i < records.size(); ++i) {
    starts[i + 1] = starts[i] + records[i].numel;
  }
  return starts;
}

// A group's learning rate as a kernel reads it: the double, or a Tensor lr's address (host memory
// for CPU kernels, device memory for CUDA kernels).
struct LearningRate {
  double value;
  const void* tensor;  // null: use value
  int32_t is_double;   // the tensor's dtype: float64 (1) or float32 (0)

  RK_HOST_DEVICE double get() const {
    if (tensor == nullptr) {
      return value;
    }
    return is_double ? *static_cast<const double*>(tensor) : double(*static_cast<const float*>(tensor));
  }
};

// Note [Group hyperparameters]: the fields of a row, in order.
struct AdamGroup {
  LearningRate lr;
  double beta1, beta2, eps, weight_decay;
};
constexpr int64_t kAdamFields = 5;  // lr, beta1, beta2, eps, weight_decay

struct AdagradGroup {
  LearningRate lr;
  double lr_decay, eps, weight_decay;
};
constexpr int64_t kAdagradFields = 4;  // lr, lr_decay, eps, weight_decay

// GradScaler's tensors as the kernels read them (host memory for CPU kernels): no host sync on CUDA.
struct AmpArgs {
  const float* grad_scale;  // null: no unscaling
  const float* found_inf;   // null: never skip

  RK_HOST_DEVICE bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }
};

// Each group's learning rate under the policy of Note [Group hyperparameters]. ``values`` holds
// the rows' lr fields; tensors converted to fp64 are kept alive in ``keep_alive`` for the call.
std::vector<LearningRate> learning_rates(const std::vector<double>& values,
                                         const c10::List<std::optional<at::Tensor>>& lr_tensors,
                                         const c10::Device& device, std::vector<at::Tensor>& keep_alive);

// Checks that ``hyper`` has ``fields`` values and lr_tensors one entry per group (``layout`` names the fields).
void check_rows(size_t hyper_size, size_t lr_tensors_size, size_t num_groups, int64_t fields, const char* layout);
constexpr const char* kAdamLayout = "lr, beta1, beta2, eps, weight_decay";
constexpr const char* kAdagradLayout = "lr, lr_decay, eps, weight_decay";

// The rows of ``hyper`` (kAdamFields per group), checked against the number of groups.
std::vector<AdamGroup> adam_groups(at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                                   size_t num_groups, const c10::Device& device, std::vector<at::Tensor>& keep_alive);

std::vector<AdagradGroup> adagrad_groups(at::ArrayRef<double> hyper,
                                         const c10::List<std::optional<at::Tensor>>& lr_tensors, size_t num_groups,
                                         const c10::Device& device, std::vector<at::Tensor>& keep_alive);

// GradScaler's grad_scale / found_inf: absent, or one-element float32 tensors on ``device``.
AmpArgs amp_args(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 const c10::Device& device);

}  // namespace recap_kernels
