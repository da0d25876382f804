// The per-element update of Adam and AdamW: the only C++ definition of these formulas.
//
// Used by the CPU kernels (csrc/cpu/adam.cpp, inside loops that g++ vectorizes) and by the CUDA
// kernels (csrc/cuda/), so the CPU tests exercise the arithmetic that runs on the GPU.
//
// Note [Math dtype]
// Math runs in float for float32/bfloat16/float16 storage and in double for float64 (the
// template parameter T); loads are exact and each result is rounded once, when stored
// (convert.h). The per-tensor scalars are computed in double from the hyperparameters and the
// tensor's step counter, then rounded to T once, as torch computes them from Python floats.
//
// Note [Operation order]
// bfloat16/float16 results must agree with torch's fused CPU kernel (FusedAdamKernel.cpp) to one
// unit in the last place after many steps, which holds only if the float arithmetic is the same
// operation for operation, with the same roundings. That is the arithmetic of torch's *compiled*
// kernel: its Vectorized<float> a * b + c is plain vector code that g++ contracts into a fused
// multiply-add where the AVX2/AVX-512 builds allow it. Measured bit for bit against torch 2.14's
// CPU kernels (tests/test_cpu_ops.py, ``test_bitwise_like_torch_fused``), these are the FMAs:
//   * exp_avg.lerp_(grad, 1 - beta1), torch's vectorized lerp: fma(w, g - m, m) for a weight
//     w < 0.5, else fma(w - 1, g - m, g);
//   * exp_avg_sq * beta2 + (1 - beta2) * g * g  ->  fma((1 - beta2) * g, g, exp_avg_sq * beta2);
//   * L2 weight decay g + p * wd  ->  fma(p, wd, g);   Adagrad's sum + g * g  ->  fma(g, g, sum);
// everything else is separately rounded: sqrt(v) / bias_correction2_sqrt + eps, p * (1 - lr * wd),
// p - (step_size * m) / denom. torch.optim's single-tensor path (the float32/float64 reference)
// computes the same FMAs through its own kernels (add with alpha, addcmul, lerp).
// So every FMA is spelled out here, and the translation units that include this header must not
// let the compiler contract anything else: g++ runs with -ffp-contract=off, and nvcc needs
// -fmad=false (torch's CUDA kernels follow a different order, in double; see
// recap_kernels/_triton/_math.py for both).
#pragma once

#include "recap_kernels/scalar_ops.h"

namespace recap_kernels {

// Weight decay of an Adam step: a compile-time switch of the kernels. A weight decay of 0 is
// kNone, never "multiply by 0", so that inf/NaN parameters behave as in torch.
enum class WeightDecay : int {
  kNone = 0,
  kL2 = 1,         // Adam: weight_decay * param folded into the gradient
  kDecoupled = 2,  // AdamW: param scaled by 1 - lr * weight_decay before the update
};

// The per-tensor scalars of one Adam step, rounded once to the math dtype T.
template <typename T>
struct AdamScalars {
  T lerp_weight;            // 1 - beta1, or (1 - beta1) - 1 when 1 - beta1 >= 0.5 (see adam_update)
  bool lerp_from_grad;      // true when 1 - beta1 >= 0.5: torch's lerp then starts from the gradient
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;           // kL2: the gradient's weight decay
  T decay_factor;           // kDecoupled: 1 - lr * weight_decay
  T step_size;              // lr / bias_correction1
  T bias_correction2_sqrt;  // sqrt(1 - beta2 ** step)
  T grad_sign;              // -1 with maximize, else 1 (multiplying by it is exact)
};

// ``step`` is the step being taken (the stored counter plus one). Double precision throughout,
// as torch's CPU fused kernel and torch.optim's Python floats.
template <typename T>
RK_HOST_DEVICE AdamScalars<T> adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                           double step, bool maximize) {
  const double bias_correction1 = 1.0 - rk_pow(beta1, step);
  const double bias_correction2 = 1.0 - rk_pow(beta2, step);
  AdamScalars<T> s;
  const T weight = T(1.0 - beta1);
  // torch's lerp tests |weight| < 0.5 on the weight rounded to the math dtype, and forms
  // weight - 1 in that dtype too.
  s.lerp_from_grad = !(weight < T(0.5) && weight > T(-0.5));
  s.lerp_weight = s.lerp_from_grad ? weight - T(1) : weight;
  s.beta2 = T(beta2);
  s.one_minus_beta2 = T(1.0 - beta2);
  s.eps = T(eps);
  s.weight_decay = T(weight_decay);
  s.decay_factor = T(1.0 - lr * weight_decay);
  s.step_size = T(lr / bias_correction1);
  s.bias_correction2_sqrt = T(rk_sqrt(bias_correction2));
  s.grad_sign = maximize ? T(-1) : T(1);
  return s;
}

// One element of an Adam/AdamW step, in place on math-dtype values; ``max_exp_avg_sq`` is read
// and written only with AMSGRAD. ``grad`` is the (already unscaled) gradient.
template <typename T, bool AMSGRAD, WeightDecay WD>
RK_HOST_DEVICE void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                const AdamScalars<T>& s) {
  T g = grad * s.grad_sign;
  if constexpr (WD == WeightDecay::kL2) {
    g = rk_fma(param, s.weight_decay, g);
  } else if constexpr (WD == WeightDecay::kDecoupled) {
    param = param * s.decay_factor;
  }
  // exp_avg.lerp_(grad, 1 - beta1), then the second moment: the FMAs of Note [Operation order].
  exp_avg = rk_fma(s.lerp_weight, g - exp_avg, select(s.lerp_from_grad, g, exp_avg));
  exp_avg_sq = rk_fma(s.one_minus_beta2 * g, g, exp_avg_sq * s.beta2);
  T second_moment = exp_avg_sq;
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = rk_sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  // torch adds (-step_size * m) / denom; negating is exact, so this is the same number.
  param = param - (s.step_size * exp_avg) / denom;
}

}  // namespace recap_kernels
