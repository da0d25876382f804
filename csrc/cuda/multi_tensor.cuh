// The multi-tensor apply of the CUDA kernels: how one launch finds its tensor, the per-tensor
// table in device memory and its cache, vectorized loads and stores, and the launch helpers.
//
// Note [Multi-tensor launch]
// One launch updates a whole bucket. Every tensor is cut into chunks of kChunk elements and each
// block of the grid updates one chunk. The per-tensor metadata is the TensorRecord table of Note
// [Tensor records] (common/records.h) in device memory, with block_begin[t], the first block of
// tensor t, after it; a block finds its tensor by binary search in block_begin.
// So a launch takes any number of tensors: torch's and apex's multi-tensor apply pass the
// metadata as a 4 KB kernel argument and relaunch every few dozen tensors.
//
// The per-group hyperparameters (lr, betas, ...) change between steps (LR schedules), so they
// travel as a kernel argument of up to kMaxLaunchGroups groups (a larger bucket is cut into one
// launch per kMaxLaunchGroups groups). The table changes only when an address does, and is
// cached (TableCache): a step whose addresses are those of an earlier step uploads nothing.
//
// Indexing: 64-bit for a tensor's chunk offset (tensors of more than 2^31 elements work), 32-bit
// inside a chunk.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "../common/records.h"
#include "recap_kernels/convert.h"

namespace recap_kernels::cuda {

constexpr int kBlockSize = 512;        // threads per block
constexpr int64_t kChunk = 65536;      // elements per block (a multiple of every vector width)
constexpr int kMaxLaunchGroups = 32;   // param groups per launch (kernel-argument hyperparameters)
constexpr int kVectorBytes = 16;       // one 128-bit load or store per thread and tensor

// The table of one launch as the kernels see it: its tensors' records, with each record's group
// renumbered within the launch.
struct LaunchTable {
  const TensorRecord* entries;
  const int64_t* block_begin;  // num_tensors + 1 entries; block_begin[num_tensors] is the grid size
  int32_t num_tensors;
};

// ------------------------------------------------------------------------------------------------
// Device side
//
// Host-device functions: a kernel's body is a function of (block, thread), so the test-only host
// emulation (emulate.cu) runs the very code the GPU runs, block by block, on CPU tensors.
// ------------------------------------------------------------------------------------------------

// The tensor whose blocks include ``block``: the last t with block_begin[t] <= block. Empty tensors
// own no block (block_begin[t] == block_begin[t + 1]) and are never found.
RK_HOST_DEVICE int32_t tensor_of_block(const LaunchTable& table, int64_t block) {
  int32_t lo = 0;
  int32_t hi = table.num_tensors - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) >> 1;
    if (table.block_begin[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Where this block works: its tensor's entry, the chunk's offset in the tensor, its length.
struct BlockWork {
  TensorRecord entry;
  int64_t offset;  // first element of the chunk
  int32_t size;    // elements in the chunk (<= kChunk)
};

RK_HOST_DEVICE BlockWork block_work(const LaunchTable& table, int64_t block) {
  const int32_t t = tensor_of_block(table, block);
  BlockWork work;
  work.entry = table.entries[t];
  work.offset = (block - table.block_begin[t]) * kChunk;
  const int64_t left = work.entry.numel - work.offset;
  work.size = static_cast<int32_t>(left < kChunk ? left : kChunk);
  return work;
}

// kVectorBytes of raw elements, loaded or stored with one instruction.
template <typename R>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / sizeof(R);
  R v[kSize];
};

template <typename R>
RK_HOST_DEVICE Vector<R> load_vector(const R* p) {
  return *reinterpret_cast<const Vector<R>*>(p);
}

template <typename R>
RK_HOST_DEVICE void store_vector(R* p, const Vector<R>& x) {
  *reinterpret_cast<Vector<R>*>(p) = x;
}

// Every step counter of the launch advances by one, unless found_inf skips the step. Runs before
// the update kernel on the same stream, which then reads the step being taken, as torch does.
RK_HOST_DEVICE void advance_step(const LaunchTable& table, int64_t t, const AmpArgs& amp) {
  if (t < table.num_tensors && !amp.skip()) {
    *table.entries[t].step += 1.0f;
  }
}

__global__ void advance_steps_kernel(LaunchTable table, AmpArgs amp);

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

// The tables of one op call, in host memory: one segment per launch, laid end to end.
struct HostTables {
  std::vector<int64_t> words;  // TensorRecord tables and block_begin arrays, 8-byte words
  struct Segment {
    size_t entries_word;      // offset of the segment's TensorRecord[] in words
    size_t block_begin_word;  // offset of its block_begin[]
    int32_t num_tensors;
    int32_t first_group;      // the launch's groups: [first_group, first_group + num_groups)
    int32_t num_groups;
    int64_t num_blocks;
  };
  std::vector<Segment> segments;
};

// The launch tables of a call's records: tensors cut into launches of at most kMaxLaunchGroups
// groups each (groups are consecutive spans of the records).
HostTables build_tables(const std::vector<TensorRecord>& records, int32_t num_groups);

// The device copy of ``tables`` (cached: see Note [Multi-tensor launch]); valid on ``stream``
// until the tables of a later call with other addresses evict it.
const int64_t* device_tables(const HostTables& tables, const at::Device& device, c10::cuda::CUDAStream stream);

inline LaunchTable launch_table(const int64_t* device_words, const HostTables::Segment& segment) {
  return LaunchTable{reinterpret_cast<const TensorRecord*>(device_words + segment.entries_word),
                     device_words + segment.block_begin_word, segment.num_tensors};
}

// Launches advance_steps_kernel for one launch's tensors.
void advance_steps(const LaunchTable& table, int32_t num_tensors, const AmpArgs& amp, cudaStream_t stream);

// A clear error when this GPU has no code in the extension (its arch was not compiled).
void check_device_supported(const at::Device& device);

// Where an op's launches go. The ops (adam.cuh, adagrad.cuh) are templates over it: CudaLaunch runs
// the kernels on the current stream of the parameters' GPU; HostLaunch (emulate.cu, test-only) runs
// the same block bodies on the host, for CPU tensors.
class CudaLaunch {
 public:
  static constexpr c10::DeviceType kDeviceType = c10::kCUDA;

  explicit CudaLaunch(const at::Device& device)
      : device_(device), guard_(device), stream_(c10::cuda::getCurrentCUDAStream(device.index())) {
    check_device_supported(device);
  }

  const int64_t* tables(const HostTables& tables) { return device_tables(tables, device_, stream_); }

  void advance(const LaunchTable& table, int32_t num_tensors, const AmpArgs& amp) {
    advance_steps(table, num_tensors, amp, stream_.stream());
  }

  cudaStream_t stream() const { return stream_.stream(); }

 private:
  at::Device device_;
  c10::cuda::CUDAGuard guard_;
  c10::cuda::CUDAStream stream_;
};

// Runs a call's launches in order: each advances its step counters, then, where it has blocks,
// ``update(segment, table)`` launches the update kernel.
template <typename Launch, typename Update>
void run_launches(Launch& launch, const HostTables& tables, const AmpArgs& amp, const Update& update) {
  const int64_t* words = launch.tables(tables);
  for (const HostTables::Segment& segment : tables.segments) {
    const LaunchTable table = launch_table(words, segment);
    launch.advance(table, segment.num_tensors, amp);
    if (segment.num_blocks > 0) {
      update(segment, table);
    }
  }
}

}  // namespace recap_kernels::cuda
