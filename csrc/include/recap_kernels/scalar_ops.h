// Scalar building blocks of the update math, spelled the same for the host and the GPU.
#pragma once

#include <cmath>

#include "recap_kernels/macros.h"

namespace recap_kernels {

template <typename T>
RK_HOST_DEVICE T rk_fma(T a, T b, T c) {
#if RK_DEVICE_CODE
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

RK_HOST_DEVICE double rk_pow(double base, double exponent) {
#if RK_DEVICE_CODE
  return ::pow(base, exponent);
#else
  return std::pow(base, exponent);
#endif
}

template <typename T>
RK_HOST_DEVICE T rk_sqrt(T x) {
#if RK_DEVICE_CODE
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// max that propagates NaN from either side, like torch.maximum (amsgrad's running maximum).
template <typename T>
RK_HOST_DEVICE T nan_propagating_max(T a, T b) {
  const T larger = a > b ? a : b;
  return a != a ? a : (b != b ? b : larger);
}

// AMP: GradScaler's loss scale is divided out in the math dtype (torch's CPU fused kernels).
template <typename T>
RK_HOST_DEVICE T unscale_grad(T g, T grad_scale) {
  return g / grad_scale;
}

}  // namespace recap_kernels
