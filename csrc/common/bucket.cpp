// BoundBucket (Note [Bound buckets] in bucket.h).
#include "bucket.h"

// torch's operator headers reach headers of its own that g++ -Wextra flags (unused parameters).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include <ATen/ops/empty.h>
#pragma GCC diagnostic pop
#include <c10/core/TensorImpl.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <sstream>

namespace recap_kernels {
namespace {

// Note [Gather fast path]
// gather() reads a handful of fields of five TensorImpls per parameter, thousands of times a step.
// Tensor::data_ptr(), numel() and friends go through out-of-line libc10 calls (has_storage(),
// storage(), data_impl()) that re-check what a dense tensor always satisfies; these read the same
// fields inline. Sizes are compared after the element count, which settles nearly every change.

// The address of a dense tensor's first element, as Tensor::const_data_ptr() returns it (nullptr
// when it has no element).
inline const void* data_of(const c10::TensorImpl* impl) {
  const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr || impl->numel() == 0) {
    return nullptr;
  }
  return static_cast<const char*>(storage->data()) + impl->storage_offset() * impl->itemsize();
}

inline bool same_sizes(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t d = 0; d < a.size(); ++d) {
    if (a[d] != b[d]) {
      return false;
    }
  }
  return true;
}

// A contiguous dense tensor of ``dtype`` on ``device`` with ``numel`` elements and ``sizes``.
inline bool dense_like(const c10::TensorImpl* impl, caffe2::TypeMeta dtype, const c10::Device& device, int64_t numel,
                       c10::IntArrayRef sizes) {
  return impl->layout() == c10::kStrided && impl->dtype() == dtype && impl->numel() == numel &&
         impl->device() == device && impl->is_contiguous() && same_sizes(impl->sizes(), sizes);
}

// ``impl`` still lives at ``data`` and is what the kernels were planned for.
inline bool same_as_planned(const c10::TensorImpl* impl, const void* data, caffe2::TypeMeta dtype,
                            const c10::Device& device, int64_t numel, c10::IntArrayRef sizes) {
  return dense_like(impl, dtype, device, numel, sizes) && data_of(impl) == data;
}

// The version counter's heap object, for a prefetch only: VariableVersion holds nothing but the
// intrusive pointer to it. A prefetch never faults, whatever the address.
inline const void* version_counter_object(const c10::TensorImpl* impl) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
  return *reinterpret_cast<const void* const*>(&impl->version_counter());
}

}  // namespace

BoundBucket::BoundBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
                         std::vector<at::Tensor> state_steps, std::vector<int64_t> group_sizes)
    : params_(std::move(params)),
      states_(std::move(states)),
      steps_(std::move(state_steps)),
      group_sizes_(std::move(group_sizes)) {
  TORCH_CHECK(!params_.empty(), "a BoundBucket needs at least one parameter");
  TORCH_CHECK(!states_.empty() && states_.size() + 2 <= static_cast<size_t>(kMaxSlots), "a BoundBucket takes 1 to ",
              kMaxSlots - 2, " state lists, got ", states_.size());
  // The list ops' checks, on the parameters standing in for their gradients (read by gather()).
  std::vector<NamedList> named;
  named.push_back({"params", params_});
  named.push_back({"params", params_});
  for (const auto& state : states_) {
    named.push_back({"states", state});
  }
  ListCall call = list_call(named, steps_, group_sizes_, params_[0].device().type());
  records_ = std::move(call.records);
  starts_ = std::move(call.starts);
  others_aligned_.reserve(records_.size());
  for (const TensorRecord& record : records_) {
    others_aligned_.push_back(record.aligned);  // the parameter (standing in for its gradient) and the states
  }
  device_ = call.device;
  dtype_ = call.dtype;
  dtype_meta_ = c10::scalarTypeToTypeMeta(dtype_);
  grad_addresses_ = at::empty({size()}, at::TensorOptions().dtype(at::kLong));
  grad_address_data_ = grad_addresses_.data_ptr<int64_t>();
  std::fill_n(grad_address_data_, size(), int64_t(0));
}

int64_t BoundBucket::changed(size_t i, const char* what) {
  std::ostringstream out;
  out << "params[" << i << "]: " << what;
  change_ = out.str();
  gathered_ = false;
  return static_cast<int64_t>(i) + 1;
}

namespace {

// Note [Gather prefetch]
// gather() touches a handful of small heap objects per parameter (the TensorImpls of the parameter,
// its gradient, its states and its step counter, their StorageImpls, the parameter's autograd
// metadata), scattered over memory; on a bucket of thousands of tiny tensors they are not in cache,
// and reading them one after another leaves the loop waiting on one cache miss at a time. So the
// loop asks for them ahead of use, in stages that follow the pointers: the TensorImpls kAhead
// parameters ahead, what they point to (storages, autograd metadata) kAhead / 2 ahead, the
// gradient's TensorImpl kAhead / 4 ahead. Prefetches never fault and change no result. And buckets
// of more than kGatherGrain parameters are checked by torch's threads in parallel (at::parallel_for):
// each waits on its own misses, and each thread's core then holds in cache the tensors it checked,
// which the kernels' split of the bucket mostly gives it again. Measured on 5,000 one-element
// tensors (2 cores): gather 1.9 -> 0.5 ms, the update after it 0.8 -> 0.35 ms.
constexpr int64_t kAhead = 16;
constexpr int64_t kGatherGrain = 1024;
constexpr uintptr_t kVectorAlignment = 16;  // the CUDA kernels' 128-bit accesses

inline void prefetch_lines(const void* p, int lines) {
  for (int k = 0; k < lines; ++k) {
    __builtin_prefetch(static_cast<const char*>(p) + 64 * k);
  }
}

inline void prefetch_impl(const at::Tensor& t) { prefetch_lines(t.unsafeGetTensorImpl(), 3); }

inline void prefetch_storage(const at::Tensor& t) {
  prefetch_lines(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 1);  // null: no harm
}

}  // namespace

const char* BoundBucket::check_and_gather(size_t i) {
  // Note [Gather fast path]
  TensorRecord& record = records_[i];
  const c10::TensorImpl* param = params_[i].unsafeGetTensorImpl();
  const c10::IntArrayRef sizes = param->sizes();
  if (!same_as_planned(param, record.slots[kParamSlot], dtype_meta_, device_, record.numel, sizes)) {
    return "the parameter's storage, dtype, shape, device or layout changed";
  }
  const at::Tensor& grad = param->grad();
  if (!grad.defined()) {
    return "the parameter has no gradient";
  }
  const c10::TensorImpl* g = grad.unsafeGetTensorImpl();
  if (!dense_like(g, dtype_meta_, device_, record.numel, sizes)) {
    return "the gradient is not a contiguous dense tensor of the parameter's dtype, shape and device";
  }
  for (size_t s = 0; s < states_.size(); ++s) {
    if (!same_as_planned(states_[s][i].unsafeGetTensorImpl(), record.slots[kGradSlot + 1 + s], dtype_meta_, device_,
                         record.numel, sizes)) {
      return "a state tensor's storage, dtype, shape, device or layout changed";
    }
  }
  const c10::TensorImpl* step = steps_[i].unsafeGetTensorImpl();
  if (step->layout() != c10::kStrided || step->dtype() != caffe2::TypeMeta::Make<float>() || step->numel() != 1 ||
      step->device() != device_ || data_of(step) != record.step) {
    return "the step counter's storage, dtype, size or device changed";
  }
  void* grad_data = const_cast<void*>(data_of(g));
  record.slots[kGradSlot] = grad_data;
  // The CUDA kernels' 128-bit path needs every slot aligned; the others' alignment was fixed with the plan.
  record.aligned = others_aligned_[i] && reinterpret_cast<uintptr_t>(grad_data) % kVectorAlignment == 0;
  grad_address_data_[i] = reinterpret_cast<int64_t>(grad_data);
  return nullptr;
}

int64_t BoundBucket::gather() {
  gathered_ = false;
  const int64_t n = size();
  std::atomic<int64_t> first_change{n};
  auto check_range = [&](int64_t begin, int64_t end) {
    auto each_planned = [&](size_t j, auto&& fn) {
      fn(params_[j]);
      for (const auto& state : states_) {
        fn(state[j]);
      }
      fn(steps_[j]);
    };
    for (int64_t i = begin; i < end; ++i) {
      // Note [Gather prefetch]
      if (i + kAhead < end) {
        each_planned(i + kAhead, prefetch_impl);
      }
      if (i + kAhead / 2 < end) {
        each_planned(i + kAhead / 2, prefetch_storage);
        prefetch_lines(params_[i + kAhead / 2].unsafeGetTensorImpl()->autograd_meta(), 2);
      }
      if (i + kAhead / 4 < end) {
        const at::Tensor& ahead = params_[i + kAhead / 4].unsafeGetTensorImpl()->grad();
        if (ahead.defined()) {
          prefetch_impl(ahead);
        }
      }
      if (check_and_gather(i) != nullptr) {
        int64_t seen = first_change.load();
        while (i < seen && !first_change.compare_exchange_weak(seen, i)) {
        }
        return;
      }
    }
  };
  at::parallel_for(0, n, kGatherGrain, check_range);
  if (first_change.load() < n) {
    const int64_t i = first_change.load();
    const char* reason = check_and_gather(i);
    return changed(i, reason != nullptr ? reason : "changed while it was being checked");
  }
  gathered_ = true;
  change_.clear();
  return 0;
}

at::Tensor BoundBucket::addresses() const {
  const int64_t slots = 2 + num_states();
  at::Tensor table = at::empty({slots + 1, size()}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < size(); ++i) {
    for (int64_t s = 0; s < slots; ++s) {
      out[s * size() + i] = reinterpret_cast<int64_t>(records_[i].slots[s]);
    }
    out[slots * size() + i] = reinterpret_cast<int64_t>(records_[i].step);
  }
  return table;
}

StepTensors BoundBucket::gathered(const char* op) const {
  TORCH_CHECK(gathered_, "BoundBucket.", op, "() needs a successful gather() in the same step",
              change_.empty() ? "" : " (the last one found: ", change_, change_.empty() ? "" : ")");
  return StepTensors{records_, starts_, device_, dtype_};
}

void BoundBucket::finish_step(bool grads_written) {
  // Note [Version counters]: every tensor the step wrote (the gradients only when AMP unscaled them),
  // the counters asked for ahead of use (Note [Gather prefetch]).
  const int64_t n = size();
  auto bump = [&](const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); };
  auto ahead = [&](const at::Tensor& t) { __builtin_prefetch(version_counter_object(t.unsafeGetTensorImpl())); };
  at::parallel_for(0, n, kGatherGrain, [&](int64_t begin, int64_t end) {  // the counters are atomic
    for (int64_t i = begin; i < end; ++i) {
      if (i + kAhead < end) {
        ahead(params_[i + kAhead]);
        for (const auto& state : states_) {
          ahead(state[i + kAhead]);
        }
        ahead(steps_[i + kAhead]);
      }
      bump(params_[i]);
      if (grads_written) {
        bump(params_[i].unsafeGetTensorImpl()->grad());
      }
      for (const auto& state : states_) {
        bump(state[i]);
      }
      bump(steps_[i]);
    }
  });
  gathered_ = false;  // the next step gathers its own gradients
}

void BoundBucket::adam_step(std::vector<double> hyper, c10::List<std::optional<at::Tensor>> lr_tensors,
                            bool amsgrad, bool decoupled, bool maximize, std::optional<at::Tensor> grad_scale,
                            std::optional<at::Tensor> found_inf) {
  TORCH_CHECK(num_states() == (amsgrad ? 3 : 2), "adam_step(amsgrad=", amsgrad, ") takes a BoundBucket with ",
              amsgrad ? 3 : 2, " state lists, this one has ", num_states());
  const AdamKernel kernel = device_kernels(device_.type(), emulate_cuda_).adam;
  TORCH_CHECK(kernel != nullptr, "recap_kernels._C has no Adam kernels for ", device_.type(),
              emulate_cuda_ ? " (CUDA emulation)" : "", " tensors");
  run_adam(kernel, gathered("adam_step"), group_sizes_, hyper, lr_tensors, adam_options(amsgrad, decoupled, maximize),
           grad_scale, found_inf);
  finish_step(grad_scale.has_value());
}

void BoundBucket::adagrad_step(std::vector<double> hyper, c10::List<std::optional<at::Tensor>> lr_tensors,
                               bool maximize, std::optional<at::Tensor> grad_scale,
                               std::optional<at::Tensor> found_inf) {
  TORCH_CHECK(num_states() == 1, "adagrad_step takes a BoundBucket with 1 state list, this one has ", num_states());
  const AdagradKernel kernel = device_kernels(device_.type(), emulate_cuda_).adagrad;
  TORCH_CHECK(kernel != nullptr, "recap_kernels._C has no Adagrad kernels for ", device_.type(),
              emulate_cuda_ ? " (CUDA emulation)" : "", " tensors");
  run_adagrad(kernel, gathered("adagrad_step"), group_sizes_, hyper, lr_tensors, maximize, grad_scale, found_inf);
  finish_step(grad_scale.has_value());
}

DeviceKernels& device_kernels(c10::DeviceType device_type, bool emulated) {
  static DeviceKernels cpu, cuda, emulated_cuda;
  if (emulated) {
    return emulated_cuda;
  }
  TORCH_CHECK(device_type == c10::kCPU || device_type == c10::kCUDA, "recap_kernels has no kernels for ",
              device_type, " tensors");
  return device_type == c10::kCPU ? cpu : cuda;
}

}  // namespace recap_kernels
