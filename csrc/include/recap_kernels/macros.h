// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds of the update math.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
// nvcc: the same functions run on the host (tests, scalars) and in kernels.
#define RK_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Plain C++: always inlined, so the math ends up inside the CPU kernels' vectorized loops.
#define RK_HOST_DEVICE inline __attribute__((always_inline))
#endif

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define RK_DEVICE_CODE 1
#else
#define RK_DEVICE_CODE 0
#endif
