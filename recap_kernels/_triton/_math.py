"""Per-element update math of the Triton kernels, in the order torch.optim applies it.

Every function takes and returns values already in the math dtype (fp32 for fp32/bf16/fp16
storage, fp64 for fp64), so the kernels round exactly once, at the store. The scalar arguments
(learning rate, bias corrections, ...) are computed once per tensor by the kernel, not per element.
"""

import triton
import triton.language as tl


@triton.jit
def _pow_scalar(base, exponent):
    """``base ** exponent`` for a positive scalar base, in fp64 (torch computes it in double)."""
    return tl.exp(exponent.to(tl.float64) * tl.log(base.to(tl.float64)))


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
def _unscale(g, grad_scale, CUDA_ORDER: tl.constexpr):
    """AMP: divide by the loss scale, in float (torch's CPU fused kernels) or double (CUDA)."""
    if CUDA_ORDER:
        return (g.to(tl.float64) / grad_scale.to(tl.float64)).to(g.dtype)
    else:
        return g / grad_scale.to(g.dtype)


@triton.jit
def _adam_scalars(lr, beta1, beta2, eps, weight_decay, step, MATH_DTYPE: tl.constexpr, CUDA_ORDER: tl.constexpr):
    """Per-tensor scalars of an Adam step (all inputs fp64; ``step`` already advanced).

    Returns ``(step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
    weight_decay, decay)``. In CPU order they are rounded to the math dtype once, as torch's CPU
    fused kernel does with its doubles; in CUDA order, the ones torch's CUDA kernel keeps in double
    stay fp64 (``decay`` is then ``lr * weight_decay``; in CPU order ``1 - lr * weight_decay``).
    """
    bias_correction1 = 1.0 - _pow_scalar(beta1, step)
    bias_correction2 = 1.0 - _pow_scalar(beta2, step)
    if CUDA_ORDER:
        bias_correction1 = bias_correction1.to(MATH_DTYPE)  # torch's CUDA kernel holds these in opmath
        step_size = (lr / bias_correction1.to(tl.float64)).to(MATH_DTYPE)
        bias_correction2_sqrt = tl.sqrt(bias_correction2.to(MATH_DTYPE))
        return (step_size, bias_correction2_sqrt, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
                lr * weight_decay)
    else:
        return ((lr / bias_correction1).to(MATH_DTYPE), tl.sqrt(bias_correction2).to(MATH_DTYPE),
                beta1.to(MATH_DTYPE), beta2.to(MATH_DTYPE), (1.0 - beta1).to(MATH_DTYPE), (1.0 - beta2).to(MATH_DTYPE),
                eps.to(MATH_DTYPE), weight_decay.to(MATH_DTYPE), (1.0 - lr * weight_decay).to(MATH_DTYPE))


@triton.jit
def _adam_math(
    p, g, m, v, v_max,
    step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, CUDA_ORDER: tl.constexpr,
):
    """One Adam/AdamW update on math-dtype values, with the scalars of :func:`_adam_scalars`.

    Returns ``(p, m, v, v_max)``. bf16/fp16 results are compared with torch's fused kernels to one
    unit in the last place after many steps, which holds only when the fp32 arithmetic follows
    theirs operation for operation, so both orders are spelled out:

    * CPU order (torch's FusedAdamKernel.cpp): float math; ``exp_avg.lerp_`` as a fused
      multiply-add (computed in fp64, which rounds like an FMA here and in the interpreter);
      AdamW scales the parameter by ``1 - lr * weight_decay``.
    * CUDA order (torch's fused_adam_utils.cuh): the moment updates and weight decay mix float
      values with double hyperparameters, so they are computed in fp64 and rounded once.
    """
    dtype = p.dtype
    if MAXIMIZE:
        g = -g
    if CUDA_ORDER:
        if weight_decay != 0:  # skipped, not multiplied by zero: inf/nan parameters behave as in torch
            if DECOUPLED:
                p = (p.to(tl.float64) - decay * p.to(tl.float64)).to(dtype)
            else:
                g = (g.to(tl.float64) + p.to(tl.float64) * weight_decay).to(dtype)
        m = (beta1 * m.to(tl.float64) + one_minus_beta1 * g.to(tl.float64)).to(dtype)
        v = (beta2 * v.to(tl.float64) + one_minus_beta2 * g.to(tl.float64) * g.to(tl.float64)).to(dtype)
    else:
        if weight_decay != 0:
            if DECOUPLED:
                p = p * decay
            else:
                g = g + weight_decay * p
        m = (one_minus_beta1.to(tl.float64) * (g - m).to(tl.float64) + m.to(tl.float64)).to(dtype)
        v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        v_max = tl.maximum(v_max, v)
        denom = tl.sqrt(v_max) / bias_correction2_sqrt
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt
    if CUDA_ORDER:
        denom = (denom.to(tl.float64) + eps).to(dtype)
    else:
        denom = denom + eps
    p = p - step_size * m / denom
    return p, m, v, v_max


@triton.jit
def _adagrad_math(p, g, acc, clr, eps, weight_decay, MAXIMIZE: tl.constexpr, CUDA_ORDER: tl.constexpr):
    """One Adagrad update with ``clr = lr / (1 + (step - 1) * lr_decay)``. Returns ``(p, acc)``.

    ``clr``, ``eps`` and ``weight_decay`` arrive in fp64 and are rounded as torch's fused kernel
    of the device does (see :func:`_adam_math`): CPU order computes in float, CUDA order in double
    wherever torch's CUDA kernel mixes in its double hyperparameters.
    """
    dtype = p.dtype
    if MAXIMIZE:
        g = -g
    if CUDA_ORDER:
        if weight_decay != 0:
            g = (g.to(tl.float64) + p.to(tl.float64) * weight_decay).to(dtype)
        acc = acc + g * g
        update = clr * g.to(tl.float64) / (tl.sqrt(acc).to(tl.float64) + eps)
        p = (p.to(tl.float64) - update).to(dtype)
    else:
        if weight_decay != 0:
            g = g + weight_decay.to(dtype) * p
        acc = acc + g * g
        p = p - clr.to(dtype) * (g / (tl.sqrt(acc) + eps.to(dtype)))
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
