"""Per-element update math of the Triton kernels, in the order torch.optim applies it.

Every function takes and returns values already in the math dtype (fp32 for fp32/bf16/fp16
storage, fp64 for fp64), so the kernels round exactly once, at the store. The scalar arguments
(learning rate, bias corrections, ...) are computed once per tensor by the kernel, not per element.

Note [Operation orders]
bf16/fp16 results are compared with torch's fused kernels to one unit in the last place after
many steps, which holds only when the fp32 arithmetic follows theirs operation for operation. The
fused kernel differs per device and, on CUDA, per torch version, so the Adam kernel takes the order
as a constexpr (``ORDER``, picked by ``multi_tensor.torch_cuda_order``):

* ``CPU_ORDER``: torch's FusedAdamKernel.cpp / FusedAdagradKernel.cpp as compiled (the spec is
  csrc/include/recap_kernels/adam_math.h and adagrad_math.h). float math with the double
  hyperparameters rounded to float once; FMAs exactly where g++ contracts torch's vector code:
  ``exp_avg.lerp_`` (torch's vectorized lerp), the second moment, L2 weight decay and Adagrad's
  ``sum + g * g``.
* ``CUDA_DOUBLE_ORDER``: torch's fused_adam_utils.cuh before torch 2.11. The hyperparameters stay
  double, so every step mixing them with float values is computed in fp64 and rounded once; nvcc's
  contractions (weight decay, the moments) are fp64 FMAs.
* ``CUDA_OPMATH_ORDER``: the same file since torch 2.11 (pytorch/pytorch#173224). Hyperparameters
  rounded to the math dtype, bias corrections with ``powf``, the moments as
  ``fma(beta, m, fma(-beta, g, g))``, and nvcc's contractions spelled out as FMAs.

In every order, fp32 division and square root are IEEE (``_div_rn``/``_sqrt_rn``), as torch's
kernels compute them: Triton's ``/`` and ``tl.sqrt`` on fp32 are approximations on the GPU. And the
kernels are launched with ``enable_fp_fusion=False``: Triton would otherwise contract any
``a * b + c`` into an FMA where torch rounds twice, so every FMA here is an explicit :func:`_fma`.
"""

import triton
import triton.language as tl

CPU_ORDER = tl.constexpr(0)
CUDA_DOUBLE_ORDER = tl.constexpr(1)
CUDA_OPMATH_ORDER = tl.constexpr(2)

# Read when the kernels are decorated, as triton.jit reads it to pick the interpreter.
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _pow_scalar(base, exponent):
    """``base ** exponent`` for a positive scalar base, in fp64 (torch computes it in double)."""
    return tl.exp(exponent.to(tl.float64) * tl.log(base.to(tl.float64)))


@triton.jit
def _fma(a, b, c):
    """``a * b + c`` rounded once, in ``c``'s dtype (C's ``fma``): ``fma.rn`` on the GPU.

    The interpreter's ``tl.fma`` rounds the product first. There, an fp32 FMA is computed in fp64,
    where the product of two fp32 values is exact, and rounded to fp32: ``fma.rn.f32`` except in
    the rare case where the sum, rounded to fp64, lands exactly halfway between two fp32 values and
    the second rounding then goes the other way. fp64 FMAs round twice in the interpreter.
    """
    if _INTERPRETED and c.dtype == tl.float32:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _div_rn(a, b):
    """IEEE (correctly rounded) ``a / b``; fp64 division always is."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt_rn(x):
    """IEEE (correctly rounded) square root; fp64 ``tl.sqrt`` always is."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _load_lr(table_lr, lr_addr_ptr, group, num_groups):
    """The group's learning rate in fp64: the table's value, or read through a Tensor lr's address."""
    kind = tl.load(lr_addr_ptr + num_groups + group)
    lr = table_lr
    if kind == 32:
        lr = tl.load(tl.load(lr_addr_ptr + group).to(tl.pointer_type(tl.float32))).to(tl.float64)
    elif kind == 64:
        lr = tl.load(tl.load(lr_addr_ptr + group).to(tl.pointer_type(tl.float64)))
    return lr


@triton.jit
def _unscale(g, grad_scale, ORDER: tl.constexpr):
    """AMP: divide by the loss scale, in the math dtype, or in double in CUDA double order."""
    if ORDER == CUDA_DOUBLE_ORDER:
        return (g.to(tl.float64) / grad_scale.to(tl.float64)).to(g.dtype)
    elif ORDER == CUDA_OPMATH_ORDER:
        return _div_rn(g, grad_scale.to(g.dtype))
    else:
        return _div_rn(g, grad_scale.to(g.dtype))


@triton.jit
def _adam_scalars(lr, beta1, beta2, eps, weight_decay, step, MATH_DTYPE: tl.constexpr, ORDER: tl.constexpr):
    """Per-tensor scalars of an Adam step (all inputs fp64; ``step`` already advanced).

    Returns ``(step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
    weight_decay, decay)``, rounded as torch's fused kernel of the order (Note [Operation orders]):

    * CPU order: computed in double and rounded to the math dtype once; ``decay`` is
      ``1 - lr * weight_decay``. ``one_minus_beta1`` is torch's lerp weight (see
      :func:`_adam_math_cpu_or_cuda_double`).
    * CUDA double order: the hyperparameters stay fp64; ``decay`` is ``lr * weight_decay``.
    * CUDA opmath order: the hyperparameters rounded to the math dtype first and everything computed
      in it; ``decay`` is ``lr * weight_decay``; the ``one_minus_beta`` are unused.
    """
    if ORDER == CUDA_OPMATH_ORDER:
        lr = lr.to(MATH_DTYPE)  # torch reads a Tensor lr as float, then casts it: the same number
        beta1 = beta1.to(MATH_DTYPE)
        beta2 = beta2.to(MATH_DTYPE)
        exponent = step.to(MATH_DTYPE)
        # powf in fp32: here pow is computed in fp64 and rounded. Neither is always correctly
        # rounded, so the two can differ by an ulp, rarely.
        bias_correction1 = 1.0 - _pow_scalar(beta1, exponent).to(MATH_DTYPE)
        bias_correction2 = 1.0 - _pow_scalar(beta2, exponent).to(MATH_DTYPE)
        weight_decay = weight_decay.to(MATH_DTYPE)
        scalars = (_div_rn(lr, bias_correction1), _sqrt_rn(bias_correction2), beta1, beta2, 1.0 - beta1, 1.0 - beta2,
                   eps.to(MATH_DTYPE), weight_decay, lr * weight_decay)
    elif ORDER == CUDA_DOUBLE_ORDER:
        # Computed in double; torch's CUDA kernel holds them in opmath.
        bias_correction1 = (1.0 - _pow_scalar(beta1, step)).to(MATH_DTYPE)
        bias_correction2 = (1.0 - _pow_scalar(beta2, step)).to(MATH_DTYPE)
        scalars = ((lr / bias_correction1.to(tl.float64)).to(MATH_DTYPE), _sqrt_rn(bias_correction2), beta1, beta2,
                   1.0 - beta1, 1.0 - beta2, eps, weight_decay, lr * weight_decay)
    else:
        bias_correction1 = 1.0 - _pow_scalar(beta1, step)
        bias_correction2 = 1.0 - _pow_scalar(beta2, step)
        scalars = ((lr / bias_correction1).to(MATH_DTYPE), tl.sqrt(bias_correction2).to(MATH_DTYPE),
                   beta1.to(MATH_DTYPE), beta2.to(MATH_DTYPE), (1.0 - beta1).to(MATH_DTYPE),
                   (1.0 - beta2).to(MATH_DTYPE), eps.to(MATH_DTYPE), weight_decay.to(MATH_DTYPE),
                   (1.0 - lr * weight_decay).to(MATH_DTYPE))
    return scalars


@triton.jit
def _adam_math(
    p, g, m, v, v_max,
    step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, ORDER: tl.constexpr,
):
    """One Adam/AdamW update on math-dtype values, with the scalars of :func:`_adam_scalars`.

    Returns ``(p, m, v, v_max)``, computed in the order ``ORDER`` (Note [Operation orders]).
    """
    if MAXIMIZE:
        g = -g
    if ORDER == CUDA_OPMATH_ORDER:
        p, m, v, v_max = _adam_math_cuda_opmath(p, g, m, v, v_max, step_size, bias_correction2_sqrt, beta1, beta2,
                                                eps, weight_decay, decay, AMSGRAD, DECOUPLED)
    else:
        p, m, v, v_max = _adam_math_cpu_or_cuda_double(
            p, g, m, v, v_max,
            step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
            decay, AMSGRAD, DECOUPLED, ORDER,
        )
    return p, m, v, v_max


@triton.jit
def _adam_math_cpu_or_cuda_double(
    p, g, m, v, v_max,
    step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, ORDER: tl.constexpr,
):
    """:func:`_adam_math` in CPU order, or in CUDA double order (fp64 wherever torch mixes in a double)."""
    dtype = p.dtype
    if ORDER == CUDA_DOUBLE_ORDER:
        if weight_decay != 0:  # skipped, not multiplied by zero: inf/nan parameters behave as in torch
            if DECOUPLED:
                p = _fma(-decay, p.to(tl.float64), p.to(tl.float64)).to(dtype)  # param -= lr * wd * param
            else:
                g = _fma(p.to(tl.float64), weight_decay, g.to(tl.float64)).to(dtype)  # grad += param * wd
        m = _fma(beta1, m.to(tl.float64), one_minus_beta1 * g.to(tl.float64)).to(dtype)
        v = _fma(beta2, v.to(tl.float64), one_minus_beta2 * g.to(tl.float64) * g.to(tl.float64)).to(dtype)
    else:
        if weight_decay != 0:
            if DECOUPLED:
                p = p * decay
            else:
                g = _fma(p, weight_decay, g)
        # exp_avg.lerp_(g, w) as torch's vectorized lerp: fma(w, g - m, m) for |w| < 0.5, else
        # fma(w - 1, g - m, g), the weight tested and w - 1 formed in the math dtype.
        small = (one_minus_beta1 < 0.5) & (one_minus_beta1 > -0.5)
        lerp_weight = tl.where(small, one_minus_beta1, one_minus_beta1 - 1.0)
        m = _fma(lerp_weight, g - m, tl.where(small, m, g))
        v = _fma(one_minus_beta2 * g, g, v * beta2)
    if AMSGRAD:
        v_max = tl.maximum(v_max, v)
        second_moment = v_max
    else:
        second_moment = v
    denom = _div_rn(_sqrt_rn(second_moment), bias_correction2_sqrt)
    if ORDER == CUDA_DOUBLE_ORDER:
        denom = (denom.to(tl.float64) + eps).to(dtype)
    else:
        denom = denom + eps
    p = p - _div_rn(step_size * m, denom)
    return p, m, v, v_max


@triton.jit
def _adam_math_cuda_opmath(p, g, m, v, v_max, step_size, bias_correction2_sqrt, beta1, beta2, eps, weight_decay,
                           decay, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr):
    """:func:`_adam_math` in CUDA opmath order: torch's ``adam_math`` line for line, all in the math dtype."""
    if weight_decay != 0:  # skipped, not multiplied by zero: inf/nan parameters behave as in torch
        if DECOUPLED:
            p = _fma(-decay, p, p)  # param -= lr * weight_decay * param, contracted by nvcc
        else:
            g = _fma(p, weight_decay, g)  # grad += param * weight_decay, contracted by nvcc
    m = _fma(beta1, m, _fma(-beta1, g, g))
    g2 = g * g
    v = _fma(beta2, v, _fma(-beta2, g2, g2))
    if AMSGRAD:
        v_max = tl.where(v_max < v, v, v_max)  # std::max(v_max, v): keeps v_max when either is NaN
        second_moment = v_max
    else:
        second_moment = v
    denom = _div_rn(_sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    p = p - _div_rn(step_size * m, denom)
    return p, m, v, v_max


@triton.jit
def _adagrad_math(p, g, acc, clr, eps, weight_decay, MAXIMIZE: tl.constexpr):
    """One Adagrad update with ``clr = lr / (1 + (step - 1) * lr_decay)``. Returns ``(p, acc)``.

    Always in torch's CPU fused order (float math, ``clr``, ``eps`` and ``weight_decay`` rounded to
    float once; the FMAs of adagrad_math.h), on every device: torch has no fused CUDA Adagrad, so
    its fused CPU kernel is the low-precision reference everywhere (our CUDA C++ Adagrad follows it
    too).
    """
    dtype = p.dtype
    if MAXIMIZE:
        g = -g
    if weight_decay != 0:
        g = _fma(p, weight_decay.to(dtype), g)
    acc = _fma(g, g, acc)
    p = p - _div_rn(clr.to(dtype) * g, _sqrt_rn(acc) + eps.to(dtype))
    return p, acc


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """Round fp32 math results to the storage dtype, to nearest even like ``Tensor.to``.

    bfloat16 is rounded with integer arithmetic: the result is what the GPU's conversion gives,
    and Triton's CPU interpreter (which truncates bfloat16 conversions) gets it right too.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays NaN (quiet), never becomes inf
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
