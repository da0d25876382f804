// Scalar building blocks of the update math, spelled the same for the host and the GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "recap_kernels/macros.h"

namespace recap_kernels {

RK_HOST_DEVICE uint32_t float_as_bits(float f) {
#if RK_DEVICE_CODE
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

RK_HOST_DEVICE float bits_as_float(uint32_t u) {
#if RK_DEVICE_CODE
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

RK_HOST_DEVICE uint64_t float_as_bits(double d) {
#if RK_DEVICE_CODE
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  return u;
#endif
}

RK_HOST_DEVICE double bits_as_float(uint64_t u) {
#if RK_DEVICE_CODE
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  std::memcpy(&d, &u, sizeof(d));
  return d;
#endif
}

// ``take_a ? a : b`` for a condition that is the same for every element, with integer masks: g++
// does not if-convert a float ?: on a flag read from memory, and the loop would not vectorize.
template <typename T>
RK_HOST_DEVICE T select(bool take_a, T a, T b) {
  using Bits = decltype(float_as_bits(a));
  const Bits mask = Bits(0) - Bits(take_a);
  return bits_as_float((float_as_bits(a) & mask) | (float_as_bits(b) & ~mask));
}

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

RK_HOST_DEVICE float rk_pow(float base, float exponent) {
#if RK_DEVICE_CODE
  return ::powf(base, exponent);
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
  // One level of selects over values computed unconditionally, so g++ vectorizes it (nested
  // ?: would evaluate the inner comparison conditionally, which blocks if-conversion).
  const T larger = a > b ? a : b;
  const bool either_nan = (a != a) | (b != b);
  return either_nan ? a + b : larger;
}

// max as std::max computes it, ``a < b ? b : a``: a NaN in ``b`` is dropped, one in ``a`` kept
// (torch's CUDA amsgrad; its CPU kernel uses nan_propagating_max).
template <typename T>
RK_HOST_DEVICE T std_max(T a, T b) {
  return a < b ? b : a;
}

// AMP: GradScaler's loss scale is divided out in the math dtype (torch's CPU fused kernels).
template <typename T>
RK_HOST_DEVICE T unscale_grad(T g, T grad_scale) {
  return g / grad_scale;
}

}  // namespace recap_kernels
