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
def _adam_math(
    p, g, m, v, v_max,
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    """One Adam/AdamW update. Returns ``(p, m, v, v_max)``.

    The scalars are computed in fp64 and rounded to the math dtype once, as torch.optim does with
    its Python-float hyperparameters: ``decay_factor`` is ``1 - lr * weight_decay`` (AdamW scales
    the parameter by it before the update) and ``step_size`` is ``lr / bias_correction1``.
    """
    if MAXIMIZE:
        g = -g
    if weight_decay != 0:  # skipped, not multiplied by zero, so inf/nan parameters behave as in torch
        if DECOUPLED:
            p = p * decay_factor
        else:
            g = g + weight_decay * p
    # torch's exp_avg.lerp_(grad, 1 - beta1): for weights below 0.5, lerp is start + w * (end - start).
    m = (one_minus_beta1.to(tl.float64) * (g - m).to(tl.float64) + m.to(tl.float64)).to(m.dtype)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        v_max = tl.maximum(v_max, v)
        denom = tl.sqrt(v_max) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * m / denom
    return p, m, v, v_max


@triton.jit
def _adagrad_math(p, g, acc, clr, eps, weight_decay, MAXIMIZE: tl.constexpr):
    """One Adagrad update with ``clr = lr / (1 + (step - 1) * lr_decay)``. Returns ``(p, acc)``."""
    if MAXIMIZE:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    acc = acc + g * g
    p = p - clr * (g / (tl.sqrt(acc) + eps))
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
