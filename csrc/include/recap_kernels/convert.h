// Loads and stores between a tensor's storage dtype and the dtype the math runs in.
//
// float32/bfloat16/float16 storage computes in float, float64 in double (Note [Math dtype]);
// converting to the math dtype is exact, and storing rounds once, to nearest even, as
// Tensor.to() and torch's fused optimizers do. bfloat16 and float16 are plain uint16_t bit
// patterns here, converted with integer arithmetic and selects only, so that
//   * g++ vectorizes the CPU kernels' loops with any instruction set (no F16C/AVX512-BF16 needed),
//   * the same code compiles for the GPU,
//   * the layout matches c10::BFloat16 / c10::Half (a single uint16_t), whose data pointers the
//     CPU kernels reinterpret.
//
// Note [Math dtype]: see adam_math.h.
#pragma once

#include <cstdint>

#include "recap_kernels/scalar_ops.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace recap_kernels {

// bfloat16 is the upper half of a float32: widening is a shift.
RK_HOST_DEVICE float bfloat16_bits_to_float(uint16_t h) { return bits_as_float(uint32_t(h) << 16); }

// Round to nearest even (c10::BFloat16's round_to_nearest_even); NaN becomes a quiet NaN, never inf.
// On the GPU one conversion instruction does the same (its NaN is 0x7fff, also quiet).
RK_HOST_DEVICE uint16_t float_to_bfloat16_bits(float f) {
#if RK_DEVICE_CODE
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t(f != f ? 0x7fc0u : rounded);
#endif
}

// IEEE half -> float, exact for every input (normals, subnormals, zeros, inf, NaN).
// All three cases are computed and one is selected, which keeps the loop branch-free; the GPU has
// an instruction for it.
RK_HOST_DEVICE float half_bits_to_float(uint16_t h) {
#if RK_DEVICE_CODE
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t shifted = uint32_t(h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exponent = shifted & 0x0f800000u;       // the half's exponent field, shifted
  const uint32_t normal = shifted + 0x38000000u;         // rebias the exponent: + (127 - 15) << 23
  const uint32_t inf_nan = shifted + 0x70000000u;        // exponent all ones in float too
  // A subnormal m * 2^-24 is (2^-14 + m * 2^-24) - 2^-14, both exact in float: 0x38800000 is 2^-14.
  const uint32_t subnormal = float_as_bits(bits_as_float(shifted + 0x38800000u) - bits_as_float(0x38800000u));
  const uint32_t magnitude = exponent == 0x0f800000u ? inf_nan : (exponent == 0u ? subnormal : normal);
  return bits_as_float(magnitude | (uint32_t(h & 0x8000u) << 16));
#endif
}

// float -> IEEE half, rounded to nearest even; overflow gives inf, NaN a quiet NaN (0x7e00; the
// GPU's conversion instruction, used there, gives 0x7fff).
RK_HOST_DEVICE uint16_t float_to_half_bits(float f) {
#if RK_DEVICE_CODE
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal halves: rebias the exponent (- (127 - 15) << 23, mod 2^32) and round the 13 dropped
  // mantissa bits to nearest even with the usual bias trick; a carry into the exponent is correct,
  // up to and including rounding to inf.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal halves (|f| < 2^-14): adding 0.5f aligns the half's mantissa with the float's last
  // bits, and the float adder rounds to nearest even for us.
  const uint32_t subnormal = float_as_bits(bits_as_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t inf_nan = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t magnitude = a >= 0x47800000u ? inf_nan : (a < 0x38800000u ? subnormal : normal);
  return uint16_t(magnitude | sign);
#endif
}

// Storage dtype tags with their raw element type and math dtype.
struct BFloat16Storage {};
struct HalfStorage {};

template <typename S>
struct Storage;

template <>
struct Storage<float> {
  using raw_t = float;
  using math_t = float;
  static RK_HOST_DEVICE math_t load(raw_t x) { return x; }
  static RK_HOST_DEVICE raw_t store(math_t x) { return x; }
};

template <>
struct Storage<double> {
  using raw_t = double;
  using math_t = double;
  static RK_HOST_DEVICE math_t load(raw_t x) { return x; }
  static RK_HOST_DEVICE raw_t store(math_t x) { return x; }
};

template <>
struct Storage<BFloat16Storage> {
  using raw_t = uint16_t;
  using math_t = float;
  static RK_HOST_DEVICE math_t load(raw_t x) { return bfloat16_bits_to_float(x); }
  static RK_HOST_DEVICE raw_t store(math_t x) { return float_to_bfloat16_bits(x); }
};

template <>
struct Storage<HalfStorage> {
  using raw_t = uint16_t;
  using math_t = float;
  static RK_HOST_DEVICE math_t load(raw_t x) { return half_bits_to_float(x); }
  static RK_HOST_DEVICE raw_t store(math_t x) { return float_to_half_bits(x); }
};

}  // namespace recap_kernels
