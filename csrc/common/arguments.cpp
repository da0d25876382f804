// The list ops' argument checks and records (arguments.h).
#include "arguments.h"

#include <c10/core/TensorImpl.h>

namespace recap_kernels {
namespace {

constexpr uintptr_t kVectorAlignment = 16;  // the CUDA kernels' 128-bit accesses

void check_list_length(const char* name, at::TensorList list, size_t expected) {
  TORCH_CHECK(list.size() == expected, name, " must have one tensor per parameter (", expected, "), got ",
              list.size());
}

void check_param(size_t i, const at::Tensor& param, const at::Tensor& first, c10::DeviceType device_type) {
  TORCH_CHECK(param.device().type() == device_type, "params[", i, "] must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", param.device());
  TORCH_CHECK(param.device() == first.device(), "params[", i, "] is on ", param.device(), " but params[0] is on ",
              first.device(), ": one call takes one device");
  TORCH_CHECK(param.scalar_type() == first.scalar_type(), "params[", i, "] has dtype ", param.scalar_type(),
              " but params[0] has ", first.scalar_type(), ": one call takes one dtype");
  TORCH_CHECK(param.is_contiguous(), "params[", i, "] must be contiguous");
}

// A gradient or state tensor must be laid out exactly as its parameter, on the same device.
void check_like_param(const char* name, size_t i, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == c10::kStrided, name, "[", i, "] must be a dense tensor, not ", t.layout());
  TORCH_CHECK(t.device() == param.device(), name, "[", i, "] is on ", t.device(), " but its parameter is on ",
              param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(),
              " but its parameter has ", param.scalar_type());
  TORCH_CHECK(t.numel() == param.numel(), name, "[", i, "] has ", t.numel(), " elements but its parameter has ",
              param.numel());
  TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
}

float* step_pointer(size_t i, const at::Tensor& step, const at::Tensor& param) {
  TORCH_CHECK(step.device() == param.device() && step.scalar_type() == at::kFloat && step.numel() == 1,
              "state_steps[", i, "] must be a one-element float32 tensor on ", param.device(),
              " (its parameter's device)");
  return step.data_ptr<float>();
}

// Each tensor's group, from the groups' sizes (consecutive spans of the tensor lists).
std::vector<int32_t> tensor_groups(at::IntArrayRef group_sizes, size_t num_tensors) {
  std::vector<int32_t> groups;
  groups.reserve(num_tensors);
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0, "group_sizes[", g, "] is negative");
    groups.insert(groups.end(), group_sizes[g], static_cast<int32_t>(g));
  }
  TORCH_CHECK(groups.size() == num_tensors, "group_sizes add up to ", groups.size(), " tensors, but params has ",
              num_tensors);
  return groups;
}

}  // namespace

ListCall list_call(const std::vector<NamedList>& slots, at::TensorList state_steps, at::IntArrayRef group_sizes,
                   c10::DeviceType device_type) {
  TORCH_INTERNAL_ASSERT(slots.size() >= 2 && slots.size() <= kMaxSlots);
  const at::TensorList params = slots.begin()->tensors;
  const size_t n = params.size();
  for (const NamedList& slot : slots) {
    check_list_length(slot.name, slot.tensors, n);
  }
  check_list_length("state_steps", state_steps, n);
  const std::vector<int32_t> groups = tensor_groups(group_sizes, n);
  ListCall call;
  call.records.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(i, p, params[0], device_type);
    TensorRecord& r = call.records[i];
    r = TensorRecord{};
    bool aligned = true;
    int s = 0;
    for (const NamedList& slot : slots) {
      const at::Tensor& t = slot.tensors[i];
      if (s > 0) {
        check_like_param(slot.name, i, t, p);
      }
      r.slots[s] = t.data_ptr();
      aligned = aligned && reinterpret_cast<uintptr_t>(r.slots[s]) % kVectorAlignment == 0;
      ++s;
    }
    r.step = step_pointer(i, state_steps[i], p);
    r.numel = p.numel();
    r.group = groups[i];
    r.aligned = aligned;
  }
  call.starts = element_starts(call.records);
  if (n > 0) {
    call.device = params[0].device();
    call.dtype = params[0].scalar_type();
  }
  return call;
}

ListCall adam_list_call(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                        at::IntArrayRef group_sizes, size_t hyper_size, size_t lr_tensors_size, bool amsgrad,
                        c10::DeviceType device_type) {
  check_rows(hyper_size, lr_tensors_size, group_sizes.size(), kAdamFields, kAdamLayout);
  if (!amsgrad) {
    check_list_length("max_exp_avg_sqs (without amsgrad)", max_exp_avg_sqs, 0);
    return list_call({{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                     state_steps, group_sizes, device_type);
  }
  return list_call({{"params", params},
                    {"grads", grads},
                    {"exp_avgs", exp_avgs},
                    {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", max_exp_avg_sqs}},
                   state_steps, group_sizes, device_type);
}

ListCall adagrad_list_call(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                           at::TensorList state_steps, at::IntArrayRef group_sizes, size_t hyper_size,
                           size_t lr_tensors_size, c10::DeviceType device_type) {
  check_rows(hyper_size, lr_tensors_size, group_sizes.size(), kAdagradFields, kAdagradLayout);
  return list_call({{"params", params}, {"grads", grads}, {"state_sums", state_sums}}, state_steps, group_sizes,
                   device_type);
}

void bump_versions(std::initializer_list<at::TensorList> lists) {
  for (const at::TensorList& list : lists) {
    for (const at::Tensor& t : list) {
      t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

void run_adam(AdamKernel kernel, const StepTensors& tensors, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
              const c10::List<std::optional<at::Tensor>>& lr_tensors, AdamOptions options,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (tensors.records.empty()) {
    return;  // nothing to update: no device to check the hyperparameters and AMP tensors against
  }
  std::vector<at::Tensor> keep_alive;
  const std::vector<AdamGroup> groups =
      adam_groups(hyper, lr_tensors, group_sizes.size(), tensors.device, keep_alive);
  kernel(tensors, groups, options, amp_args(grad_scale, found_inf, tensors.device));
}

void run_adagrad(AdagradKernel kernel, const StepTensors& tensors, at::IntArrayRef group_sizes,
                 at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (tensors.records.empty()) {
    return;
  }
  std::vector<at::Tensor> keep_alive;
  const std::vector<AdagradGroup> groups =
      adagrad_groups(hyper, lr_tensors, group_sizes.size(), tensors.device, keep_alive);
  kernel(tensors, groups, maximize, amp_args(grad_scale, found_inf, tensors.device));
}

}  // namespace recap_kernels
