// The CUDA kernels of recap_kernels::fused_sparse_adagrad_ and fused_rowwise_adagrad_ (the block bodies
// and the op are in embedding.cuh; Note [CUDA table steps]).
#include <c10/cuda/CUDAException.h>

#include "embedding.cuh"

namespace recap_kernels::cuda {
namespace {

template <typename S>
__global__ void __launch_bounds__(kTableBlockSize) sparse_adagrad_kernel(const __grid_constant__ TableLaunch t) {
  sparse_adagrad_block<S>(t, blockIdx.x, threadIdx.x);
}

template <typename S, bool WEIGHT_DECAY>
__global__ void __launch_bounds__(kTableBlockSize) rowwise_adagrad_kernel(const __grid_constant__ TableLaunch t) {
  using M = typename Storage<S>::math_t;
  __shared__ M partials[kTableBlockSize];
  const RowRun run = row_run(t, blockIdx.x);
  if (t.amp.skip() || run.empty()) {  // the same for every thread of the block: no barrier is left waiting
    return;
  }
  const AdagradScalars<M> s = launch_scalars<M>(t);
  partials[threadIdx.x] = rowwise_partial<S, WEIGHT_DECAY>(t, run, s, threadIdx.x);
  __syncthreads();
  const RowwiseRow<M> r = rowwise_row<S>(t, run, s, partials);
  __syncthreads();  // every thread has read the old accumulator before thread 0 stores the new one
  rowwise_apply<S, WEIGHT_DECAY>(t, run, s, r, threadIdx.x);
}

struct TableCudaLaunch : CudaLaunch {
  using CudaLaunch::CudaLaunch;

  template <typename S>
  void sparse_adagrad(const TableLaunch& t) {
    sparse_adagrad_kernel<S><<<static_cast<unsigned>(t.blocks), kTableBlockSize, 0, stream()>>>(t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename S, bool WEIGHT_DECAY>
  void rowwise(const TableLaunch& t) {
    rowwise_adagrad_kernel<S, WEIGHT_DECAY><<<static_cast<unsigned>(t.blocks), kTableBlockSize, 0, stream()>>>(t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

// A sparse gradient carries SparseCUDA, which outranks CUDA (Note [Table op dispatch] in
// ../cpu/embedding.cpp): both keys get the same functions.
TORCH_LIBRARY_IMPL(recap_kernels, CUDA, m) {
  m.impl("fused_sparse_adagrad_", &table_op_kernel<&table_op<TableCudaLaunch>, false>);
  m.impl("fused_rowwise_adagrad_", &table_op_kernel<&table_op<TableCudaLaunch>, true>);
}

TORCH_LIBRARY_IMPL(recap_kernels, SparseCUDA, m) {
  m.impl("fused_sparse_adagrad_", &table_op_kernel<&table_op<TableCudaLaunch>, false>);
  m.impl("fused_rowwise_adagrad_", &table_op_kernel<&table_op<TableCudaLaunch>, true>);
}

}  // namespace recap_kernels::cuda
