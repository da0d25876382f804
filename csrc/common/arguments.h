// Argument checks of the fused step ops (Note [Fused step ops] in ../ops.cpp), shared by the CPU
// and CUDA kernels: both take the same lists and reject the same calls, each for its own device.
// Every check runs before the first byte is written, so a call that raises changes nothing.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "recap_kernels/convert.h"

namespace recap_kernels {

inline void check_group_list(const char* name, size_t size, size_t num_groups) {
  TORCH_CHECK(size == num_groups, name, " must have one entry per group (", num_groups, "), got ", size);
}

inline void check_list_length(const char* name, at::TensorList list, size_t expected) {
  TORCH_CHECK(list.size() == expected, name, " must have one tensor per parameter (", expected, "), got ",
              list.size());
}

// Group index of every tensor, from the groups' sizes (consecutive spans of the tensor lists).
inline std::vector<int32_t> tensor_groups(at::IntArrayRef group_sizes, int64_t num_tensors) {
  std::vector<int32_t> groups;
  groups.reserve(num_tensors);
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0, "group_sizes[", g, "] is negative");
    groups.insert(groups.end(), group_sizes[g], static_cast<int32_t>(g));
  }
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == num_tensors, "group_sizes add up to ", groups.size(),
              " tensors, but params has ", num_tensors);
  return groups;
}

// The list checks of fused_adam_ (one tensor per parameter in every list, max_exp_avg_sqs only with
// amsgrad, one entry per group in every per-group list); returns each tensor's group.
inline std::vector<int32_t> check_adam_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                             at::TensorList state_steps, at::IntArrayRef group_sizes,
                                             at::ArrayRef<double> lrs, at::ArrayRef<double> beta1s,
                                             at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                                             at::ArrayRef<double> weight_decays, bool amsgrad) {
  const size_t n = params.size();
  check_list_length("grads", grads, n);
  check_list_length("exp_avgs", exp_avgs, n);
  check_list_length("exp_avg_sqs", exp_avg_sqs, n);
  check_list_length("max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  check_list_length("state_steps", state_steps, n);
  const size_t num_groups = group_sizes.size();
  check_group_list("lrs", lrs.size(), num_groups);
  check_group_list("beta1s", beta1s.size(), num_groups);
  check_group_list("beta2s", beta2s.size(), num_groups);
  check_group_list("epss", epss.size(), num_groups);
  check_group_list("weight_decays", weight_decays.size(), num_groups);
  return tensor_groups(group_sizes, static_cast<int64_t>(n));
}

// The list checks of fused_adagrad_, as check_adam_lists.
inline std::vector<int32_t> check_adagrad_lists(at::TensorList params, at::TensorList grads,
                                                at::TensorList state_sums, at::TensorList state_steps,
                                                at::IntArrayRef group_sizes, at::ArrayRef<double> lrs,
                                                at::ArrayRef<double> lr_decays, at::ArrayRef<double> epss,
                                                at::ArrayRef<double> weight_decays) {
  const size_t n = params.size();
  check_list_length("grads", grads, n);
  check_list_length("state_sums", state_sums, n);
  check_list_length("state_steps", state_steps, n);
  const size_t num_groups = group_sizes.size();
  check_group_list("lrs", lrs.size(), num_groups);
  check_group_list("lr_decays", lr_decays.size(), num_groups);
  check_group_list("epss", epss.size(), num_groups);
  check_group_list("weight_decays", weight_decays.size(), num_groups);
  return tensor_groups(group_sizes, static_cast<int64_t>(n));
}

// params[i]: on the kernels' device type, one dtype per call (that of params[0]), contiguous.
inline void check_param(size_t i, const at::Tensor& param, const at::Tensor& first, c10::DeviceType device_type) {
  TORCH_CHECK(param.device().type() == device_type, "params[", i, "] must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", param.device());
  TORCH_CHECK(param.device() == first.device(), "params[", i, "] is on ", param.device(), " but params[0] is on ",
              first.device(), ": one call takes one device");
  TORCH_CHECK(param.scalar_type() == first.scalar_type(), "params[", i, "] has dtype ", param.scalar_type(),
              " but params[0] has ", first.scalar_type(), ": one call takes one dtype");
  TORCH_CHECK(param.is_contiguous(), "params[", i, "] must be contiguous");
}

// A state or gradient tensor must be laid out exactly as its parameter, on the same device.
inline void check_like_param(const char* name, size_t i, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), name, "[", i, "] is on ", t.device(), " but its parameter is on ",
              param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(),
              " but its parameter has ", param.scalar_type());
  TORCH_CHECK(t.numel() == param.numel(), name, "[", i, "] has ", t.numel(), " elements but its parameter has ",
              param.numel());
  TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
}

// The step counter of params[i]: a one-element float32 tensor on the parameter's device.
inline float* step_pointer(size_t i, const at::Tensor& step, const at::Tensor& param) {
  TORCH_CHECK(step.device() == param.device() && step.scalar_type() == at::kFloat && step.numel() == 1,
              "state_steps[", i, "] must be a one-element float32 tensor on ", param.device(), " (its parameter's device)");
  return step.data_ptr<float>();
}

// GradScaler's grad_scale / found_inf: absent, or a one-element float32 tensor on ``device``.
inline const float* amp_scalar(const char* name, const std::optional<at::Tensor>& t, const c10::Device& device) {
  if (!t.has_value() || !t->defined()) {
    return nullptr;
  }
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, name,
              " must be a one-element float32 tensor on ", device);
  return t->data_ptr<float>();
}

inline void check_lr_tensor(size_t g, const at::Tensor& lr) {
  TORCH_CHECK(lr.numel() == 1, "lr_tensors[", g, "] must have one element, got ", lr.numel());
}

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

}  // namespace recap_kernels
