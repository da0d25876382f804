// The per-element update of dense Adagrad: the only C++ definition of this formula.
//
// Math dtype and operation order as in adam_math.h (Note [Math dtype], Note [Operation order]):
// the order and the FMAs are those of torch's compiled fused CPU kernel (FusedAdagradKernel.cpp),
// so including translation units must not contract anything else into FMAs.
#pragma once

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

// ``step`` is the step being taken (the stored counter plus one); double precision as torch.
template <typename T>
RK_HOST_DEVICE AdagradScalars<T> adagrad_scalars(double lr, double lr_decay, double eps, double weight_decay,
                                                 double step, bool maximize) {
  AdagradScalars<T> s;
  s.clr = T(lr / (1.0 + (step - 1.0) * lr_decay));
  s.eps = T(eps);
  s.weight_decay = T(weight_decay);
  s.grad_sign = maximize ? T(-1) : T(1);
  return s;
}

// One element of an Adagrad step, in place on math-dtype values; ``grad`` is already unscaled.
template <typename T, bool WEIGHT_DECAY>
RK_HOST_DEVICE void adagrad_update(T& param, T grad, T& state_sum, const AdagradScalars<T>& s) {
  T g = grad * s.grad_sign;
  if constexpr (WEIGHT_DECAY) {
    g = rk_fma(param, s.weight_decay, g);
  }
  state_sum = rk_fma(g, g, state_sum);
  const T std = rk_sqrt(state_sum) + s.eps;
  param = param - (s.clr * g) / std;
}

}  // namespace recap_kernels
