// Test-only: the CUDA kernels' block bodies run on the host, for CPU tensors.
//
// A kernel of csrc/cuda/ is a function of (block, thread) with no shared memory and no
// synchronization between threads (adam_block, adagrad_block), so running every (block, thread)
// pair in turn on the CPU computes exactly what the GPU computes, up to the host's libm (powf
// in the bias corrections). The ops _emulate_cuda_fused_adam_ / _emulate_cuda_fused_adagrad_ take
// the arguments of fused_adam_ / fused_adagrad_ and run them that way: the same op templates,
// argument checks, tables (segments, block -> tensor search, 128-bit and tail paths, misaligned
// slots) and CUDA-order math, so a machine without a GPU tests the GPU code (tests/test_cuda_ops.py).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "../common/bucket.h"
#include "adagrad.cuh"
#include "adam.cuh"
#include "embedding.cuh"

namespace recap_kernels::cuda {
namespace {

class HostLaunch {
 public:
  static constexpr c10::DeviceType kDeviceType = c10::kCPU;

  explicit HostLaunch(const at::Device& /*device*/) {}

  // The tables in a 64-byte aligned host buffer (TensorRecord is 16-byte aligned).
  const int64_t* tables(const HostTables& tables) {
    buffer_ = at::empty({static_cast<int64_t>(tables.words.size())}, at::TensorOptions().dtype(at::kLong));
    std::memcpy(buffer_.data_ptr<int64_t>(), tables.words.data(), tables.words.size() * sizeof(int64_t));
    return buffer_.data_ptr<int64_t>();
  }

  void advance(const LaunchTable& table, int32_t num_tensors, const AmpArgs& amp) {
    for (int64_t t = 0; t < num_tensors; ++t) {
      advance_step(table, t, amp);
    }
  }

 protected:
  template <typename Body>
  static void each_thread(int64_t num_blocks, const Body& body) {
    for (int64_t block = 0; block < num_blocks; ++block) {
      for (int32_t thread = 0; thread < kBlockSize; ++thread) {
        body(block, thread);
      }
    }
  }

 private:
  at::Tensor buffer_;
};

struct AdamHostLaunch : HostLaunch {
  using HostLaunch::HostLaunch;

  template <typename S, bool AMSGRAD, WeightDecay WD>
  void adam(const LaunchTable& table, int64_t num_blocks, const AdamGroups& groups, const AmpArgs& amp,
            bool maximize) {
    each_thread(num_blocks, [&](int64_t block, int32_t thread) {
      adam_block<S, AMSGRAD, WD>(table, groups, amp, maximize, block, thread);
    });
  }
};

struct AdagradHostLaunch : HostLaunch {
  using HostLaunch::HostLaunch;

  template <typename S>
  void adagrad(const LaunchTable& table, int64_t num_blocks, const AdagradGroups& groups, const AmpArgs& amp,
               bool maximize) {
    each_thread(num_blocks, [&](int64_t block, int32_t thread) {
      adagrad_block<S>(table, groups, amp, maximize, block, thread);
    });
  }
};

// The table kernels' blocks in turn; a row-wise block runs each phase for all its threads before the
// next, which is what its barriers guarantee on the GPU (Note [CUDA table steps]).
struct TableHostLaunch {
  static constexpr c10::DeviceType kDeviceType = c10::kCPU;

  explicit TableHostLaunch(const at::Device& /*device*/) {}

  template <typename S>
  void sparse_adagrad(const TableLaunch& t) {
    for (int64_t block = 0; block < t.blocks; ++block) {
      for (int32_t thread = 0; thread < kTableBlockSize; ++thread) {
        sparse_adagrad_block<S>(t, block, thread);
      }
    }
  }

  template <typename S, bool WEIGHT_DECAY>
  void rowwise(const TableLaunch& t) {
    using M = typename Storage<S>::math_t;
    M partials[kTableBlockSize];
    for (int64_t block = 0; block < t.blocks; ++block) {
      const RowRun run = row_run(t, block);
      if (t.amp.skip() || run.empty()) {
        continue;
      }
      const AdagradScalars<M> s = launch_scalars<M>(t);
      for (int32_t thread = 0; thread < kTableBlockSize; ++thread) {
        partials[thread] = rowwise_partial<S, WEIGHT_DECAY>(t, run, s, thread);
      }
      const RowwiseRow<M> r = rowwise_row<S>(t, run, s, partials);
      for (int32_t thread = 0; thread < kTableBlockSize; ++thread) {
        rowwise_apply<S, WEIGHT_DECAY>(t, run, s, r, thread);
      }
    }
  }
};

template <bool ROWWISE>
void emulated_table_op(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> hyper,
                       const c10::List<std::optional<at::Tensor>>& lr_tensors, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  table_op<TableHostLaunch>(ROWWISE ? "_emulate_cuda_fused_rowwise_adagrad_" : "_emulate_cuda_fused_sparse_adagrad_",
                            ROWWISE, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, maximize,
                            grad_scale, found_inf);
}

}  // namespace

// Sparse gradients carry SparseCPU (Note [Table op dispatch] in ../cpu/embedding.cpp).
TORCH_LIBRARY_IMPL(recap_kernels, SparseCPU, m) {
  m.impl("_emulate_cuda_fused_sparse_adagrad_", &emulated_table_op<false>);
  m.impl("_emulate_cuda_fused_rowwise_adagrad_", &emulated_table_op<true>);
}

TORCH_LIBRARY_IMPL(recap_kernels, CPU, m) {
  m.impl("_emulate_cuda_fused_sparse_adagrad_", &emulated_table_op<false>);
  m.impl("_emulate_cuda_fused_rowwise_adagrad_", &emulated_table_op<true>);
  m.impl("_emulate_cuda_fused_adam_", &fused_adam<AdamHostLaunch>);
  m.impl("_emulate_cuda_fused_adagrad_", &fused_adagrad<AdagradHostLaunch>);
  // BoundBucket.set_emulate_cuda(True): a CPU bucket's steps through the same block bodies.
  device_kernels(c10::kCPU, /*emulated=*/true).adam = &adam_records<AdamHostLaunch>;
  device_kernels(c10::kCPU, /*emulated=*/true).adagrad = &adagrad_records<AdagradHostLaunch>;
}

}  // namespace recap_kernels::cuda
