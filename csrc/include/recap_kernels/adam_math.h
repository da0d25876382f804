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
// let the compiler contract anything else: g++ runs with -ffp-contract=off, nvcc with -fmad=false.
//
// Note [CUDA operation order]
// torch's fused CUDA kernel (ATen/native/cuda/fused_adam_utils.cuh) orders the arithmetic
// differently, and differently across torch versions, so the CUDA kernels use adam_update_cuda
// below, in one of two orders picked when the extension is built (setup.py reads the header of
// the torch it builds against, RECAP_KERNELS_TORCH_CUDA_ADAM_OPMATH):
//   * opmath (torch >= 2.11): hyperparameters rounded to the math dtype, bias corrections with
//     powf, the moments as fma(beta, m, fma(-beta, g, g)) ("lerp with fma");
//   * double (older torch): hyperparameters kept in double, so every step that mixes them with
//     a float value is computed in double and rounded once; the moments as beta * m + (1 - beta) * g.
// In both, torch's build lets nvcc contract a * b + c into an FMA; the contractions it makes are
// spelled out here as rk_fma (weight decay, AdamW's decay, the double-order moments).
#pragma once

#include <type_traits>

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

// ------------------------------------------------------------------------------------------------
// CUDA order (Note [CUDA operation order])
// ------------------------------------------------------------------------------------------------

// The per-tensor scalars of one Adam step in torch's CUDA order. H is the type the
// hyperparameters are held in: the math dtype T (opmath order) or double (double order).
template <typename T, bool OPMATH>
struct AdamCudaScalars {
  using H = std::conditional_t<OPMATH, T, double>;
  H lr, beta1, beta2, eps, weight_decay;
  T step_size;              // lr / bias_correction1
  T bias_correction2_sqrt;  // sqrt(1 - beta2 ** step), in T
};

// ``step`` is the step being taken, as stored in the (float32) step counter.
template <typename T, bool OPMATH>
RK_HOST_DEVICE AdamCudaScalars<T, OPMATH> adam_cuda_scalars(double lr, double beta1, double beta2, double eps,
                                                            double weight_decay, float step) {
  using H = typename AdamCudaScalars<T, OPMATH>::H;
  AdamCudaScalars<T, OPMATH> s;
  s.lr = H(lr);
  s.beta1 = H(beta1);
  s.beta2 = H(beta2);
  s.eps = H(eps);
  s.weight_decay = H(weight_decay);
  const H exponent = H(T(step));
  const T bias_correction1 = T(H(1) - rk_pow(s.beta1, exponent));
  const T bias_correction2 = T(H(1) - rk_pow(s.beta2, exponent));
  s.step_size = T(s.lr / H(bias_correction1));
  s.bias_correction2_sqrt = rk_sqrt(bias_correction2);
  return s;
}

// AMP: the loss scale divided out in H, as torch's CUDA kernel does.
template <typename T, bool OPMATH>
RK_HOST_DEVICE T unscale_grad_cuda(T g, float grad_scale) {
  using H = typename AdamCudaScalars<T, OPMATH>::H;
  return T(H(g) / H(grad_scale));
}

// One element of an Adam/AdamW step in torch's CUDA order; ``grad`` is already unscaled.
// ``WD`` is how a nonzero weight decay applies (kL2 or kDecoupled); a zero one is skipped at run time.
template <typename T, bool OPMATH, bool AMSGRAD, WeightDecay WD>
RK_HOST_DEVICE void adam_update_cuda(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                     const AdamCudaScalars<T, OPMATH>& s, bool maximize) {
  using H = typename AdamCudaScalars<T, OPMATH>::H;
  T g = maximize ? -grad : grad;
  if (s.weight_decay != H(0)) {  // skipped, not multiplied by zero: inf/NaN parameters as in torch
    if constexpr (WD == WeightDecay::kDecoupled) {
      param = T(rk_fma(-(s.lr * s.weight_decay), H(param), H(param)));  // param -= lr * wd * param
    } else {
      g = T(rk_fma(H(param), s.weight_decay, H(g)));  // grad += param * wd
    }
  }
  if constexpr (OPMATH) {
    exp_avg = rk_fma(s.beta1, exp_avg, rk_fma(-s.beta1, g, g));
    const T g2 = g * g;
    exp_avg_sq = rk_fma(s.beta2, exp_avg_sq, rk_fma(-s.beta2, g2, g2));
  } else {
    exp_avg = T(rk_fma(s.beta1, H(exp_avg), (H(1) - s.beta1) * H(g)));
    exp_avg_sq = T(rk_fma(s.beta2, H(exp_avg_sq), (H(1) - s.beta2) * H(g) * H(g)));
  }
  T second_moment = exp_avg_sq;
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = std_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = T(H(rk_sqrt(second_moment) / s.bias_correction2_sqrt) + s.eps);
  param = param - (s.step_size * exp_avg) / denom;
}

}  // namespace recap_kernels
