// The per-element update of dense Adagrad: the only C++ definition of this formula.
//
// Math dtype and operation order as in adam_math.h (Note [Math dtype], Note [Operation order]):
// adagrad_scalars / adagrad_update compute in the order and with the FMAs of torch's compiled fused
// CPU kernel (FusedAdagradKernel.cpp), and the CPU kernels use them. The CUDA kernels use
// adagrad_cuda_scalars / adagrad_update_cuda, torch's fused CUDA Adagrad, where the torch they are
// built against has one (Note [CUDA Adagrad order]). Including translation units must not contract
// anything into FMAs that these functions do not spell out.
//
// Note [CPU Adagrad tail order]
// torch's fused CPU Adagrad has a vector loop and a scalar tail loop too, split as Note [CPU tail
// order] in adam_math.h says (the last numel % W elements of each tensor). Its AVX2 build contracts
// both alike, measured as for Adam (tests/test_cpu_ops.py, test_tails_are_torchs_to_the_bit, and the
// disassembly of libtorch_cpu.so): g + p * wd -> fma(p, wd, g) and sum + g * g -> fma(g, g, sum), the
// rest separately rounded; bfloat16/float16 tails convert the hyperparameters to float as the
// vector loop does. So kVector and kTail are one order here; the DEFAULT build (no FMA instruction)
// rounds both products (kPlainVector, kPlainTail). The host code of the AVX2 build fuses the lr decay's
// 1 + (step - 1) * lr_decay into fma(step - 1, lr_decay, 1) (vfmadd*sd), which float64 results show:
// adagrad_scalars' ``fma``.
//
// Note [CUDA Adagrad order]
// torch >= 2.12 has a fused CUDA Adagrad: adagrad_math and FusedAdagradMathFunctor in
// ATen/native/cuda/fused_adagrad_utils.cuh. With opmath_t the math dtype T (float for
// float32/bfloat16/float16 storage, double for float64) and every hyperparameter a double, it computes
//
//   lr_double    = lr_ptr ? *lr_ptr : lr;             // a Tensor lr is a float on the device
//   denom        = 1 + (*step_count - 1) * lr_decay;  // float step - 1, times a double: double
//   corrected_lr = lr_double / denom;                 // double, once per tensor
//   if (found_inf_ptr && *found_inf_ptr == 1) return;
//   grad /= double(*grad_scale_ptr);                  // in double, rounded to T
//   if (maximize) grad = -grad;
//   if (weight_decay != 0) grad += param * weight_decay;                // in double, rounded to T
//   state_sum += grad * grad;                                           // in T
//   param = param - corrected_lr * grad / (std::sqrt(state_sum) + eps);  // sqrt in T, the rest in double
//
// with the step counter already advanced (torch/optim/adagrad.py adds 1 before the kernel runs). So
// with float math the last line runs in double and is rounded to float once, where the CPU order
// computes it in float from clr and eps rounded to float: the two orders differ in the last bit of
// many float32 results, and of bfloat16/float16 ones where a float result lies near a rounding
// boundary of the storage type (now and then). Where the torch we build against has this kernel
// (RECAP_KERNELS_TORCH_CUDA_FUSED_ADAGRAD=1, set by setup.py from torch's installed header), the CUDA
// kernels compute in its order; otherwise they keep the CPU order, as torch's only fused Adagrad then.
//
// torch is built with nvcc's default --fmad=true, which contracts a multiply whose result feeds an
// add into one fused multiply-add (FFMA in float, DFMA in double); ours are built with --fmad=false,
// so each contraction is spelled out as rk_fma. We assume nvcc made every contraction the source
// offers, and nothing else:
//   * 1 + (step - 1) * lr_decay      -> fma(double(step - 1), lr_decay, 1.0)              double
//   * grad += param * weight_decay   -> T(fma(double(param), weight_decay, double(grad)))  double
//   * state_sum += grad * grad       -> fma(grad, grad, state_sum)                         T
// and none in the last line: corrected_lr * grad feeds a division, not an add, and the division
// (double) and square root (in T) are IEEE: torch is not built with --use_fast_math.
// The source cannot tell which of these nvcc really made: each is a multiply with one use feeding an
// add, which nvcc contracts at -O3 (the assumption of Note [CUDA operation order] in adam_math.h too),
// but only torch's compiled kernel can confirm it. The gpu-marked test in tests/test_cuda_ops.py runs
// torch's own fused CUDA Adagrad against ours, bit for bit.
//
// What the CPU tests can see of these assumptions: the float FMA of state_sum changes float32 and
// float16 results often (bfloat16 ones rarely). The two double FMAs move a double result by an ulp
// now and then, which float64 storage sees; a float result moves only when that double lies within
// an ulp of a float rounding boundary. For values without structure that is rare (about 2^-29 of the
// time), but a decimal weight decay makes it common enough to see: when param's significand is a
// multiple of 5, param * 0.1 is param / 10, a float, plus param * (0.1 - 1/10), under a double ulp;
// its sum with grad is then often exactly halfway between two floats but for that remainder, which
// rounding the product first loses. So a separately rounded weight decay shows in float32 too (one
// element in 65,537 on the first step of tests/test_cuda_ops.py). The lr_decay FMA only moves the
// double corrected_lr by an ulp: only the float64 tests (emulated CUDA kernels, Triton interpreter)
// pin it down.
//
// AMP: T(double(grad) / double(scale)) is the correctly rounded quotient in T: a double carries more
// than 2 * 24 + 2 bits, so rounding twice cannot differ from rounding once. unscale_grad's
// division in T is the same number, and cheaper. torch skips a step on found_inf == 1 and then
// subtracts found_inf from the step counters; our kernels skip on found_inf != 0 and leave the
// counters alone (multi_tensor.cuh). GradScaler's found_inf is 0 or 1, where the two agree.
#pragma once

#include "recap_kernels/adam_math.h"  // TorchCpuLoop, mul_add
#include "recap_kernels/scalar_ops.h"

namespace recap_kernels {

// The per-tensor scalars of one Adagrad step, rounded once to the math dtype T.
template <typename T>
struct AdagradScalars {
  T clr;           // lr / (1 + (step - 1) * lr_decay)
  T eps;
  T weight_decay;  // used only by the kernels' weight-decay variant (0 means: skip it)
  T grad_sign;     // -1 with maximize, else 1
};

// ``step`` is the step being taken (the stored counter plus one); double precision as torch. ``fma``:
// torch's AVX2 build, whose host code computes 1 + (step - 1) * lr_decay as one FMA (Note [CPU Adagrad
// tail order]); false for its DEFAULT build, and for the CUDA kernels' CPU-order fallback (as before).
template <typename T>
RK_HOST_DEVICE AdagradScalars<T> adagrad_scalars(double lr, double lr_decay, double eps, double weight_decay,
                                                 double step, bool maximize, bool fma = false) {
  AdagradScalars<T> s;
  s.clr = T(lr / (fma ? rk_fma(step - 1.0, lr_decay, 1.0) : 1.0 + (step - 1.0) * lr_decay));
  s.eps = T(eps);
  s.weight_decay = T(weight_decay);
  s.grad_sign = maximize ? T(-1) : T(1);
  return s;
}

// One element of an Adagrad step, in place on math-dtype values; ``grad`` is already unscaled. LOOP:
// which of torch's loops to follow (Note [CPU Adagrad tail order]).
template <typename T, bool WEIGHT_DECAY, TorchCpuLoop LOOP = TorchCpuLoop::kVector>
RK_HOST_DEVICE void adagrad_update(T& param, T grad, T& state_sum, const AdagradScalars<T>& s) {
  constexpr bool kFma = has_fma(LOOP);
  T g = grad * s.grad_sign;
  if constexpr (WEIGHT_DECAY) {
    g = mul_add<kFma>(param, s.weight_decay, g);
  }
  state_sum = mul_add<kFma>(g, g, state_sum);
  const T std = rk_sqrt(state_sum) + s.eps;
  param = param - (s.clr * g) / std;
}

// ------------------------------------------------------------------------------------------------
// CUDA order (Note [CUDA Adagrad order])
// ------------------------------------------------------------------------------------------------

// The per-tensor scalars of one Adagrad step in torch's CUDA order: doubles, as torch's kernel holds
// them, whatever the math dtype.
struct AdagradCudaScalars {
  double clr;           // corrected_lr = lr / (1 + (step - 1) * lr_decay)
  double eps;
  double weight_decay;  // used only by the kernels' weight-decay variant (0 means: skip it)
  bool maximize;
};

// ``step`` is the step being taken, as stored in the (float32) step counter.
RK_HOST_DEVICE AdagradCudaScalars adagrad_cuda_scalars(double lr, double lr_decay, double eps, double weight_decay,
                                                       float step, bool maximize) {
  AdagradCudaScalars s;
  // torch's ``1 + (*step_count - 1) * lr_decay``: the float counter minus 1 in float, the rest
  // in double, the multiply-add contracted by nvcc.
  s.clr = lr / rk_fma(double(step - 1.0f), lr_decay, 1.0);
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.maximize = maximize;
  return s;
}

// One element of an Adagrad step in torch's CUDA order, in place on math-dtype values; ``grad`` is
// already unscaled. Every operation that mixes in a double hyperparameter runs in double, as in
// torch's kernel, and its result is rounded to T once.
template <typename T, bool WEIGHT_DECAY>
RK_HOST_DEVICE void adagrad_update_cuda(T& param, T grad, T& state_sum, const AdagradCudaScalars& s) {
  T g = s.maximize ? -grad : grad;
  if constexpr (WEIGHT_DECAY) {
    g = T(rk_fma(double(param), s.weight_decay, double(g)));  // grad += param * weight_decay
  }
  state_sum = rk_fma(g, g, state_sum);  // state_sum += grad * grad, in T
  const double denom = double(rk_sqrt(state_sum)) + s.eps;
  param = T(double(param) - s.clr * double(g) / denom);
}

}  // namespace recap_kernels
