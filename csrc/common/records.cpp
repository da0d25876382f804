// Per-group hyperparameters and AMP scalars of a call (Note [Group hyperparameters] in records.h).
#include "records.h"

// torch's operator headers reach headers of its own that g++ -Wextra flags (unused parameters).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include <ATen/ops/to.h>
#pragma GCC diagnostic pop
#include <c10/core/ScalarType.h>

namespace recap_kernels {

std::vector<LearningRate> learning_rates(const std::vector<double>& values,
                                         const c10::List<std::optional<at::Tensor>>& lr_tensors,
                                         const c10::Device& device, std::vector<at::Tensor>& keep_alive) {
  TORCH_CHECK(lr_tensors.size() == values.size(), "lr_tensors must have one entry per group (", values.size(),
              "), got ", lr_tensors.size());
  std::vector<LearningRate> rates(values.size());
  for (size_t g = 0; g < values.size(); ++g) {
    rates[g] = LearningRate{values[g], nullptr, 0};
    const std::optional<at::Tensor> lr = lr_tensors.get(g);
    if (!lr.has_value() || !lr->defined()) {
      continue;
    }
    TORCH_CHECK(lr->numel() == 1, "lr_tensors[", g, "] must have one element (Tensor lr must be 1-element), got ",
                lr->numel());
    TORCH_CHECK(at::isFloatingType(lr->scalar_type()), "lr_tensors[", g, "] must be a floating-point tensor, not ",
                lr->scalar_type());
    if (lr->device() != device) {
      TORCH_CHECK(lr->is_cpu(), "lr_tensors[", g, "] is on ", lr->device(), " but the parameters are on ", device,
                  ": a Tensor lr must be on the CPU or on the parameters' device");
      rates[g].value = lr->item<double>();  // a host read: no device sync
      continue;
    }
    at::Tensor value = *lr;
    if (value.scalar_type() != at::kFloat && value.scalar_type() != at::kDouble) {
      value = value.to(at::kDouble);
      keep_alive.push_back(value);
    }
    rates[g].tensor = value.const_data_ptr();
    rates[g].is_double = value.scalar_type() == at::kDouble;
  }
  return rates;
}

void check_rows(size_t hyper_size, size_t lr_tensors_size, size_t num_groups, int64_t fields, const char* layout) {
  TORCH_CHECK(hyper_size == num_groups * fields, "hyper must have ", fields, " values per group (", layout, ") for ",
              num_groups, " groups, got ", hyper_size);
  TORCH_CHECK(lr_tensors_size == num_groups, "lr_tensors must have one entry per group (", num_groups, "), got ",
              lr_tensors_size);
}

namespace {

// Column ``field`` of every row; checks that there are exactly ``fields`` values per group.
std::vector<double> column(at::ArrayRef<double> hyper, size_t num_groups, int64_t fields, int64_t field,
                           const char* layout) {
  TORCH_CHECK(hyper.size() == num_groups * fields, "hyper must have ", fields, " values per group (", layout,
              ") for ", num_groups, " groups, got ", hyper.size());
  std::vector<double> values(num_groups);
  for (size_t g = 0; g < num_groups; ++g) {
    values[g] = hyper[g * fields + field];
  }
  return values;
}

}  // namespace

std::vector<AdamGroup> adam_groups(at::ArrayRef<double> hyper, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                                   size_t num_groups, const c10::Device& device, std::vector<at::Tensor>& keep_alive) {
  const std::vector<LearningRate> rates =
      learning_rates(column(hyper, num_groups, kAdamFields, 0, kAdamLayout), lr_tensors, device, keep_alive);
  std::vector<AdamGroup> groups(num_groups);
  for (size_t g = 0; g < num_groups; ++g) {
    const double* row = hyper.data() + g * kAdamFields;
    groups[g] = AdamGroup{rates[g], row[1], row[2], row[3], row[4]};
  }
  return groups;
}

std::vector<AdagradGroup> adagrad_groups(at::ArrayRef<double> hyper,
                                         const c10::List<std::optional<at::Tensor>>& lr_tensors, size_t num_groups,
                                         const c10::Device& device, std::vector<at::Tensor>& keep_alive) {
  const std::vector<LearningRate> rates =
      learning_rates(column(hyper, num_groups, kAdagradFields, 0, kAdagradLayout), lr_tensors, device, keep_alive);
  std::vector<AdagradGroup> groups(num_groups);
  for (size_t g = 0; g < num_groups; ++g) {
    const double* row = hyper.data() + g * kAdagradFields;
    groups[g] = AdagradGroup{rates[g], row[1], row[2], row[3]};
  }
  return groups;
}

namespace {

const float* amp_scalar(const char* name, const std::optional<at::Tensor>& t, const c10::Device& device) {
  if (!t.has_value() || !t->defined()) {
    return nullptr;
  }
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, name,
              " must be a one-element float32 tensor on ", device, ", got ", t->scalar_type(), " on ", t->device());
  return t->const_data_ptr<float>();
}

}  // namespace

AmpArgs amp_args(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 const c10::Device& device) {
  return AmpArgs{amp_scalar("grad_scale", grad_scale, device), amp_scalar("found_inf", found_inf, device)};
}

}  // namespace recap_kernels
