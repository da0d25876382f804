// Host side of the multi-tensor apply (Note [Multi-tensor launch] in multi_tensor.cuh): building
// the per-launch tables, their device cache, the step-counter kernel, and the arch check.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <list>
#include <mutex>

#include "multi_tensor.cuh"

namespace recap_kernels::cuda {

__global__ void advance_steps_kernel(LaunchTable table, AmpArgs amp) {
  advance_step(table, int64_t(blockIdx.x) * blockDim.x + threadIdx.x, amp);
}

void advance_steps(const LaunchTable& table, int32_t num_tensors, const AmpArgs& amp, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int blocks = (num_tensors + kThreads - 1) / kThreads;
  advance_steps_kernel<<<blocks, kThreads, 0, stream>>>(table, amp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

constexpr int64_t kRecordWords = sizeof(TensorRecord) / sizeof(int64_t);

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

HostTables build_tables(const std::vector<TensorRecord>& records, int32_t num_groups) {
  HostTables tables;
  const int32_t n = static_cast<int32_t>(records.size());
  // Launch k takes groups [k * kMaxLaunchGroups, (k + 1) * kMaxLaunchGroups): a consecutive span of
  // tensors, since groups are consecutive spans of the records.
  int32_t first = 0;
  while (first < n) {
    const int32_t launch = records[first].group / kMaxLaunchGroups;
    int32_t last = first;
    while (last < n && records[last].group / kMaxLaunchGroups == launch) {
      ++last;
    }
    HostTables::Segment segment;
    segment.num_tensors = last - first;
    segment.first_group = launch * kMaxLaunchGroups;
    segment.num_groups = std::min(kMaxLaunchGroups, num_groups - segment.first_group);
    segment.entries_word = tables.words.size();  // even: every segment is a whole number of 16-byte pairs
    segment.block_begin_word = segment.entries_word + segment.num_tensors * kRecordWords;
    tables.words.resize(segment.block_begin_word + ((segment.num_tensors + 2) & ~1));  // n + 1, rounded up to even
    auto* entries = reinterpret_cast<TensorRecord*>(tables.words.data() + segment.entries_word);
    int64_t* block_begin = tables.words.data() + segment.block_begin_word;
    int64_t blocks = 0;
    for (int32_t i = first; i < last; ++i) {
      TensorRecord& e = entries[i - first];
      e = records[i];
      e.group -= segment.first_group;
      block_begin[i - first] = blocks;
      blocks += ceil_div(records[i].numel, kChunk);
    }
    block_begin[segment.num_tensors] = blocks;
    segment.num_blocks = blocks;
    tables.segments.push_back(segment);
    first = last;
  }
  return tables;
}

// ------------------------------------------------------------------------------------------------
// The table cache
// ------------------------------------------------------------------------------------------------
namespace {

// Uploads go through kernel arguments, not cudaMemcpyAsync: a copy from pageable host memory may
// synchronize with the stream, and one from pinned memory captured in a CUDA graph would read that
// host buffer again at every replay. Kernel arguments are copied when the launch is enqueued, and
// a captured launch keeps its own copy. CUDA 12.1 allows 32 KB of them (4 KB before).
#if CUDART_VERSION >= 12010
constexpr int kPayloadWords = 4000;
#else
constexpr int kPayloadWords = 496;
#endif

struct Payload {
  int64_t words[kPayloadWords];
};

__global__ void write_words_kernel(int64_t* __restrict__ dst, const __grid_constant__ Payload payload, int32_t count) {
  for (int32_t i = threadIdx.x; i < count; i += blockDim.x) {
    dst[i] = payload.words[i];
  }
}

void upload(int64_t* dst, const std::vector<int64_t>& words, cudaStream_t stream) {
  Payload payload;
  for (size_t begin = 0; begin < words.size(); begin += kPayloadWords) {
    const int32_t count = static_cast<int32_t>(std::min<size_t>(kPayloadWords, words.size() - begin));
    std::memcpy(payload.words, words.data() + begin, count * sizeof(int64_t));
    write_words_kernel<<<1, 256, 0, stream>>>(dst + begin, payload, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

uint64_t hash_words(const std::vector<int64_t>& words) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const int64_t w : words) {
    h = (h ^ static_cast<uint64_t>(w)) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h;
}

struct CacheEntry {
  c10::DeviceIndex device;
  uint64_t hash;
  std::vector<int64_t> words;
  at::Tensor buffer;        // int64 words on the device
  cudaStream_t allocated_on;
  bool pinned;              // used while a CUDA graph was captured: its replays read this buffer
};

// Least recently used first out; entries a captured graph reads are never evicted.
class TableCache {
 public:
  // A hit on another stream than the upload's assumes that stream is ordered after it, as any
  // tensor handed between streams must be (CUDA-graph capture synchronizes the device first).
  const int64_t* get(const std::vector<int64_t>& words, const at::Device& device, c10::cuda::CUDAStream stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;
    const uint64_t hash = hash_words(words);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device.index() && it->hash == hash && it->words == words) {
        entries_.splice(entries_.begin(), entries_, it);
        return use(entries_.front(), stream, capturing);
      }
    }
    CacheEntry entry{device.index(), hash, words,
                     at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions().dtype(at::kLong).device(device)),
                     stream.stream(), false};
    upload(entry.buffer.data_ptr<int64_t>(), entry.words, stream.stream());
    entries_.push_front(std::move(entry));
    evict();
    return use(entries_.front(), stream, capturing);
  }

 private:
  static constexpr size_t kMaxEntries = 64;

  static const int64_t* use(CacheEntry& entry, c10::cuda::CUDAStream stream, bool capturing) {
    entry.pinned = entry.pinned || capturing;
    if (stream.stream() != entry.allocated_on) {
      // Freed (evicted) while a kernel on this stream may still read it: the allocator waits.
      c10::cuda::CUDACachingAllocator::recordStream(entry.buffer.storage().data_ptr(), stream);
    }
    return entry.buffer.data_ptr<int64_t>();
  }

  void evict() {
    size_t unpinned = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (!it->pinned && ++unpinned > kMaxEntries) {
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }

  std::mutex mutex_;
  std::list<CacheEntry> entries_;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // leaked: freeing CUDA memory at exit can outlive the driver
  return *cache;
}

}  // namespace

const int64_t* device_tables(const HostTables& tables, const at::Device& device, c10::cuda::CUDAStream stream) {
  return table_cache().get(tables.words, device, stream);
}

// ------------------------------------------------------------------------------------------------
// Arch check
// ------------------------------------------------------------------------------------------------
void check_device_supported(const at::Device& device) {
  static std::mutex mutex;
  static std::vector<int8_t> checked;  // per device: 0 unknown, 1 supported
  std::lock_guard<std::mutex> lock(mutex);
  const size_t index = static_cast<size_t>(device.index());
  if (checked.size() <= index) {
    checked.resize(index + 1, 0);
  }
  if (checked[index]) {
    return;
  }
  cudaFuncAttributes attributes;
  const cudaError_t error = cudaFuncGetAttributes(&attributes, advance_steps_kernel);
  if (error == cudaErrorNoKernelImageForDevice || error == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // clear it: the error is ours to report
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device.index()));
    TORCH_CHECK(false, "recap_kernels._C has no CUDA code for ", prop.name, " (sm_", prop.major, prop.minor,
                "): rebuild with TORCH_CUDA_ARCH_LIST including ", prop.major, ".", prop.minor,
                " (`python -m recap_kernels info` lists the archs this build has)");
  }
  C10_CUDA_CHECK(error);
  checked[index] = 1;
}

}  // namespace recap_kernels::cuda
