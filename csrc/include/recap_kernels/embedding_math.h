// The per-row math of the table ops (Note [Table ops] in ../../ops.cpp): exact sparse Adagrad and
// row-wise Adagrad on one row of an embedding table, the only C++ definition of these formulas.
//
// Plain inline functions of the math dtype T (float for float32/bfloat16/float16 tables, double for
// float64: Note [Math dtype] in adam_math.h), for the CPU kernels (cpu/embedding.cpp) and, later,
// CUDA ones. The scalars are adagrad_math.h's: clr = lr / (1 + (step - 1) * lr_decay) in double,
// rounded to T once per table (no FMA: torch's sparse branch computes it in Python). Every function
// takes a gradient already unscaled (AMP) and summed over the row's duplicate entries.
//
// Note [Sparse Adagrad order]
// torch.optim.Adagrad's sparse branch (``_single_tensor_adagrad``) coalesces the gradient and then
// runs separate tensor ops on its values: sum += g.pow(2); std = sqrt(sum) + eps; param.add_(g / std,
// alpha=-clr). So g * g is rounded before it is added, and g / std before it is scaled by clr: the
// element update below keeps that order, in T, without FMA. torch rounds each of those intermediates
// to a bfloat16/float16 table's dtype too; we round only what is stored (the sum and the weight), so
// 16-bit tables agree with torch to about an ulp, not to the bit. For float32 both compute in float,
// but torch's vectorized sqrt and its axpy for ``add_`` are not ours, so an element now and then
// differs in the last bit.
//
// Note [Row-wise Adagrad order]
// FBGEMM's EXACT_ROWWISE_ADAGRAD (the float64 reference is tests/reference.py's
// rowwise_adagrad_reference): per row, g = sign * grad (+ weight_decay * w, L2), the accumulator grows
// by the mean of g * g over the row, and every weight of the row moves by the row's multiplier
// clr / (sqrt(sum) + eps) times g, as FBGEMM computes it. The mean is a sum of squares in T divided by
// the row length; the multiplier uses the new sum before it is rounded to the table's dtype.
#pragma once

#include <cstdint>

#include "recap_kernels/adagrad_math.h"  // AdagradScalars, adagrad_scalars
#include "recap_kernels/scalar_ops.h"

namespace recap_kernels {

// The per-table scalars of one table-op step: adagrad_math.h's, without its host FMA (torch's sparse
// branch computes clr in Python). ``step`` is the step being taken (the stored counter plus one).
template <typename T>
RK_HOST_DEVICE AdagradScalars<T> table_scalars(double lr, double lr_decay, double eps, double weight_decay,
                                               double step, bool maximize) {
  return adagrad_scalars<T>(lr, lr_decay, eps, weight_decay, step, maximize, /*fma=*/false);
}

// One element of an exact sparse Adagrad step, in place on math-dtype values (Note [Sparse Adagrad
// order]); ``grad`` is the row's summed gradient. No weight decay: torch rejects it for sparse gradients.
template <typename T>
RK_HOST_DEVICE void sparse_adagrad_update(T& param, T grad, T& state_sum, const AdagradScalars<T>& s) {
  const T g = grad * s.grad_sign;
  const T g2 = g * g;
  state_sum = state_sum + g2;
  const T std = rk_sqrt(state_sum) + s.eps;
  const T step = g / std;
  param = param - s.clr * step;
}

// Row-wise Adagrad, first pass over a row: the gradient the row's update uses (Note [Row-wise Adagrad
// order]), whose squares the caller sums.
template <typename T, bool WEIGHT_DECAY>
RK_HOST_DEVICE T rowwise_grad(T grad, T param, const AdagradScalars<T>& s) {
  T g = grad * s.grad_sign;
  if constexpr (WEIGHT_DECAY) {
    g = g + s.weight_decay * param;
  }
  return g;
}

// Row-wise Adagrad, once per row: adds the mean square (``sum_sq`` over ``dim`` elements) to the row's
// accumulator and returns the row's multiplier clr / (sqrt(sum) + eps).
template <typename T>
RK_HOST_DEVICE T rowwise_multiplier(T& state_sum, T sum_sq, int64_t dim, const AdagradScalars<T>& s) {
  state_sum = state_sum + sum_sq / T(dim);
  return s.clr / (rk_sqrt(state_sum) + s.eps);
}

// Row-wise Adagrad, second pass over a row: one weight.
template <typename T>
RK_HOST_DEVICE T rowwise_update(T param, T g, T multiplier) {
  return param - multiplier * g;
}

}  // namespace recap_kernels
