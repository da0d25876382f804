// recap_kernels::BoundBucket: a bucket's per-parameter tensor lists, held on the C++ side across
// steps (registered in ../ops.cpp; used by fused_adam_bucket_ and fused_adagrad_bucket_, whose CPU
// and CUDA kernels run the list ops' kernels on its lists).
//
// Note [Bound buckets]
// An op call from Python converts every Python list it takes into C++ (about 160 ns a tensor),
// so a step over 5,000 small tensors spends milliseconds converting five lists whose tensors
// are the same every step. A BoundBucket is built once, when the optimizer's plan is built, from
// the lists that do not change between steps (params, state, step counters, group sizes); the
// *_bucket_ ops then take it plus the step's gradients and per-group hyperparameters, and run
// the list ops' kernels on the stored lists: same checks, same math, same results.
//
// Eager mode only. The bucket's tensors are hidden from the dispatcher inside the object, so
// torch.compile (and anything else that traces or functionalizes) cannot see their mutation:
// traced code calls the list ops (recap_kernels/backends/cpu_kernels.py does when
// torch.compiler.is_compiling()). Like the list ops (whose calls leave the version counters
// as they were), they do not bump the version counters of the tensors they update.
//
// The object holds references to the tensors, not their data pointers: pointers are read at
// each call, so a tensor whose storage is swapped (``p.data = ...``) is still updated where its
// data lives. A bucket whose tensor *objects* change (load_state_dict, a new plan) needs a new
// BoundBucket; the Python side builds one per plan.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace recap_kernels {

struct BoundBucket : torch::CustomClassHolder {
  // ``states``: the optimizer's per-parameter state lists in the order its op takes them
  // (Adam: exp_avgs, exp_avg_sqs, max_exp_avg_sqs, the last empty unless amsgrad; Adagrad:
  // state_sums). The kernels check lengths, dtypes and sizes at every call, as the list ops do.
  BoundBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
              std::vector<at::Tensor> state_steps, std::vector<int64_t> group_sizes)
      : params(std::move(params)),
        states(std::move(states)),
        state_steps(std::move(state_steps)),
        group_sizes(std::move(group_sizes)) {}

  // The state lists for an op that takes ``expected`` of them.
  const std::vector<std::vector<at::Tensor>>& states_for(const char* op, size_t expected) const {
    TORCH_CHECK(states.size() == expected, op, " takes a BoundBucket with ", expected, " state lists, got ",
                states.size());
    return states;
  }

  int64_t size() const { return static_cast<int64_t>(params.size()); }

  std::vector<at::Tensor> params;
  std::vector<std::vector<at::Tensor>> states;
  std::vector<at::Tensor> state_steps;
  std::vector<int64_t> group_sizes;
};

// The *_bucket_ ops: the list op ``ListOp`` of a device (fused_adam_cpu, fused_adam_cuda, ...) on
// the bucket's lists. Adam's states are exp_avgs, exp_avg_sqs, max_exp_avg_sqs; Adagrad's state_sums.
template <auto ListOp>
void fused_adam_bucket(const c10::intrusive_ptr<BoundBucket>& bucket, at::TensorList grads, at::ArrayRef<double> lrs,
                       const c10::List<std::optional<at::Tensor>>& lr_tensors, at::ArrayRef<double> beta1s,
                       at::ArrayRef<double> beta2s, at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays,
                       bool amsgrad, bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  const auto& states = bucket->states_for("fused_adam_bucket_", 3);
  ListOp(bucket->params, grads, states[0], states[1], states[2], bucket->state_steps, bucket->group_sizes, lrs,
         lr_tensors, beta1s, beta2s, epss, weight_decays, amsgrad, decoupled, maximize, grad_scale, found_inf);
}

template <auto ListOp>
void fused_adagrad_bucket(const c10::intrusive_ptr<BoundBucket>& bucket, at::TensorList grads,
                          at::ArrayRef<double> lrs, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                          at::ArrayRef<double> lr_decays, at::ArrayRef<double> epss,
                          at::ArrayRef<double> weight_decays, bool maximize,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const auto& states = bucket->states_for("fused_adagrad_bucket_", 1);
  ListOp(bucket->params, grads, states[0], bucket->state_steps, bucket->group_sizes, lrs, lr_tensors, lr_decays, epss,
         weight_decays, maximize, grad_scale, found_inf);
}

// Registers torch.classes.recap_kernels.BoundBucket, once. Called by every static registration
// that needs the class (ops.cpp's schemas, the kernels' TORCH_LIBRARY_IMPL, whose signatures name
// it): static initializers of different files run in an unspecified order, so whichever runs
// first registers it. Defined in ops.cpp: nvcc mistakes the class_ registration, compiled inline
// into a .cu file, for device code.
void register_bound_bucket_class();

}  // namespace recap_kernels
