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
// Note [CPU tail order]
// torch's fused CPU kernels run each thread's piece of a tensor through the vector loop of Note
// [Operation order], W elements at a time, and the piece's last ``size % W`` elements through a scalar
// loop written out separately in the same source, which g++ contracted differently. A thread's piece
// is a whole number of 64-byte units (cache_line_aligned_task_unit) except the tensor's last one, and W
// divides 64 bytes, so per tensor the scalar loop gets exactly the last ``numel % W`` elements, however
// torch splits the tensor between its threads. W is Vectorized<scalar_t>::size() of the build that
// runs: 32 bytes of the storage dtype (8 float, 4 double, 16 bfloat16/float16) for AVX2 and DEFAULT.
// Our kernels split elements differently (Note [CPU work split] in csrc/cpu/multi_tensor.h), so each
// tensor's last ``numel % W`` elements are computed in the tail's order (TorchCpuLoop::kTail),
// whichever of our threads gets them.
//
// The tail's FMAs, measured bit for bit against torch 2.14.1's own torch._fused_adam_ /
// _fused_adamw_ on tensors of 1 to 7 elements (all tail: W >= 4) with random values, every option
// (L2 and decoupled weight decay, amsgrad, maximize, 1 - beta1 on both sides of 0.5, grad_scale) in
// float32, float64, bfloat16 and float16 (tests/test_cpu_ops.py, test_tails_are_torchs_to_the_bit),
// and read off the disassembly of torch's AVX2 kernel in libtorch_cpu.so (vfmadd*ss/sd):
//   * the moments' lerp and L2 weight decay as in the vector loop: fma(w, g - m, m) (w < 0.5, else
//     fnmadd(g - m, 1 - w, g), the same number as fma(w - 1, g - m, g)); fma(p, wd, g);
//   * exp_avg_sq * beta2 + (1 - beta2) * g * g  ->  fma(exp_avg_sq, beta2, ((1 - beta2) * g) * g):
//     the other product is the one fused (the vector loop fuses (1 - beta2) * g times g);
//   * amsgrad's maximum is std::max(max_exp_avg_sq, exp_avg_sq): a NaN exp_avg_sq is dropped, where
//     the vector loop's maximum() propagates it;
//   * nothing else (division, square root, the parameter update) is contracted.
// The per-tensor scalars are computed by the same compiled code, in double: there the AVX2 build fuses
// AdamW's 1 - lr * weight_decay into fma(-lr, weight_decay, 1) (vfnmadd*sd; Adagrad's
// 1 + (step - 1) * lr_decay likewise), which float64 results show (adam_scalars' ``fma``).
// Which kernel torch runs (csrc/cpu/torch_kernels.cpp): at::get_cpu_capability() as ATen's
// DispatchStub reads it (ATEN_CPU_CAPABILITY overrides it), and whether torch has an AVX-512 build of
// the kernel at all. torch 2.14's x86-64 wheels build the fused optimizers for DEFAULT and AVX2 only
// (their DispatchStub's AVX512 entry is null), so an AVX-512 CPU runs the AVX2 kernel, W = 32 bytes;
// a torch with an AVX-512 build would run W = 64 bytes, in an order we assume to be AVX2's (unmeasured).
// The DEFAULT build (ATEN_CPU_CAPABILITY=default, or a CPU without AVX2/FMA) has no FMA instruction:
// vector and tail loops alike round every product and sum (TorchCpuLoop::kPlainVector / kPlainTail),
// measured the same way in a subprocess with ATEN_CPU_CAPABILITY=default; its tail differs from its
// vector loop only in amsgrad's maximum, as above. Off x86-64 (aarch64's NEON and SVE builds) nothing
// was measured: the kernels compute as the DEFAULT build there.
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

// The loop of torch's compiled fused CPU kernel whose arithmetic an element follows (Note [CPU
// tail order]). kVector is the default: the CUDA kernels' CPU-order fallback uses it.
enum class TorchCpuLoop : int {
  kVector = 0,       // the vector loop of torch's AVX2 build (Note [Operation order])
  kTail = 1,         // the scalar tail loop of that build
  kPlainVector = 2,  // the vector loop of torch's DEFAULT build: no FMA
  kPlainTail = 3,    // the scalar tail loop of the DEFAULT build: no FMA
};

constexpr bool has_fma(TorchCpuLoop loop) { return loop == TorchCpuLoop::kVector || loop == TorchCpuLoop::kTail; }
constexpr bool is_tail(TorchCpuLoop loop) { return loop == TorchCpuLoop::kTail || loop == TorchCpuLoop::kPlainTail; }

// a * b + c as one fused multiply-add, or as a rounded product and a rounded sum (the translation
// units are compiled with -ffp-contract=off, so the second stays two operations).
template <bool FMA, typename T>
RK_HOST_DEVICE T mul_add(T a, T b, T c) {
  if constexpr (FMA) {
    return rk_fma(a, b, c);
  } else {
    return a * b + c;
  }
}

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
// as torch's CPU fused kernel and torch.optim's Python floats. ``fma``: torch's AVX2 build, whose host
// code fuses 1 - lr * weight_decay into one FMA (Note [CPU tail order]); false for its DEFAULT build.
template <typename T>
RK_HOST_DEVICE AdamScalars<T> adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                           double step, bool maximize, bool fma = false) {
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
  s.decay_factor = T(fma ? rk_fma(-lr, weight_decay, 1.0) : 1.0 - lr * weight_decay);
  s.step_size = T(lr / bias_correction1);
  s.bias_correction2_sqrt = T(rk_sqrt(bias_correction2));
  s.grad_sign = maximize ? T(-1) : T(1);
  return s;
}

// One element of an Adam/AdamW step, in place on math-dtype values; ``max_exp_avg_sq`` is read
// and written only with AMSGRAD. ``grad`` is the (already unscaled) gradient. LOOP: which of torch's
// loops to follow (Note [CPU tail order]).
template <typename T, bool AMSGRAD, WeightDecay WD, TorchCpuLoop LOOP = TorchCpuLoop::kVector>
RK_HOST_DEVICE void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                const AdamScalars<T>& s) {
  constexpr bool kFma = has_fma(LOOP);
  T g = grad * s.grad_sign;
  if constexpr (WD == WeightDecay::kL2) {
    g = mul_add<kFma>(param, s.weight_decay, g);
  } else if constexpr (WD == WeightDecay::kDecoupled) {
    param = param * s.decay_factor;
  }
  // exp_avg.lerp_(grad, 1 - beta1), then the second moment: the FMAs of Note [Operation order] and
  // Note [CPU tail order].
  exp_avg = mul_add<kFma>(s.lerp_weight, g - exp_avg, select(s.lerp_from_grad, g, exp_avg));
  if constexpr (LOOP == TorchCpuLoop::kVector) {
    exp_avg_sq = rk_fma(s.one_minus_beta2 * g, g, exp_avg_sq * s.beta2);
  } else if constexpr (LOOP == TorchCpuLoop::kTail) {
    exp_avg_sq = rk_fma(exp_avg_sq, s.beta2, (s.one_minus_beta2 * g) * g);
  } else {
    exp_avg_sq = exp_avg_sq * s.beta2 + (s.one_minus_beta2 * g) * g;
  }
  T second_moment = exp_avg_sq;
  if constexpr (AMSGRAD) {
    if constexpr (is_tail(LOOP)) {
      max_exp_avg_sq = std_max(max_exp_avg_sq, exp_avg_sq);
    } else {
      max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
    }
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
