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
* ``CUDA_DOUBLE_ORDER``: torch's fused_adam_utils.cuh before torch 2.11, and its fused_adagrad_utils.cuh
  (torch >= 2.12, the Adagrad kernel's order on CUDA there: ``multi_tensor.torch_cuda_adagrad_order``).
  The hyperparameters stay double, so every step mixing them with float values is computed in fp64
  and rounded once; nvcc's contractions (weight decay, Adam's moments, Adagrad's lr decay) are fp64
  FMAs, Adagrad's ``sum + g * g`` an fp32 one (Note [CUDA Adagrad order] in adagrad_math.h).
* ``CUDA_OPMATH_ORDER``: the same file since torch 2.11 (pytorch/pytorch#173224). Hyperparameters
  rounded to the math dtype, bias corrections with ``powf``, the moments as
  ``fma(beta, m, fma(-beta, g, g))``, and nvcc's contractions spelled out as FMAs.

Before torch 2.12 torch had no fused CUDA Adagrad, and the Adagrad kernel keeps the CPU order on
every device.

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

    The interpreter's ``tl.fma`` rounds the product first; there, :func:`_fma_from_fp64_arithmetic`
    computes what ``fma.rn`` computes.
    """
    if _INTERPRETED:
        return _fma_from_fp64_arithmetic(a, b, c)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _fma_from_fp64_arithmetic(a, b, c):
    """``fma.rn`` of fp32 or fp64 values (the dtype of ``c``; ``a`` and ``b`` tensors of it), exactly,
    from correctly rounded fp64 additions and multiplications: what the interpreter has.

    fp32: the product of two fp32 values is exact in fp64, and their sum rounded to odd in fp64 and
    then to nearest in fp32 is the sum rounded once to fp32 (fp64 has more than 24 + 2 bits).
    fp64: Boldo and Melquiond's emulation ("Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", IEEE TC 2008): the product as an exact sum of two doubles
    (Dekker), ``c`` plus its rounded part as another (TwoSum), the two remainders added rounded to
    odd, and the whole rounded once. Where that is not finite (inf or NaN operands, or ``a`` or ``b``
    beyond 2^996, whose split overflows), the plain arithmetic's result.
    """
    if c.dtype == tl.float32:
        return _add_round_to_odd(a.to(tl.float64) * b.to(tl.float64), c.to(tl.float64)).to(tl.float32)
    else:
        a_hi, a_lo = _split(a)
        b_hi, b_lo = _split(b)
        product = a * b
        product_error = ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
        sum_hi, sum_lo = _two_sum(c, product)
        exact = sum_hi + _add_round_to_odd(sum_lo, product_error)
        return tl.where(exact - exact == 0, exact, product + c)


@triton.jit
def _two_sum(a, b):
    """``(s, e)``: ``s = a + b`` rounded to nearest and ``s + e == a + b`` exactly (Knuth's TwoSum)."""
    s = a + b
    b_part = s - a
    e = (a - (s - b_part)) + (b - b_part)
    return s, e


@triton.jit
def _split(a):
    """fp64 ``a == hi + lo`` exactly, each half with at most 26 significant bits (Veltkamp)."""
    scaled = a * 134217729.0  # 2 ** 27 + 1
    hi = scaled - (scaled - a)
    return hi, a - hi


@triton.jit
def _add_round_to_odd(a, b):
    """fp64 ``a + b`` rounded to odd: an exact sum as it is, any other to the neighbour with an odd last bit."""
    s, e = _two_sum(a, b)
    bits = s.to(tl.int64, bitcast=True)
    # Rounded to nearest, s is one of the two neighbours of a + b; when its last bit is even, the other
    # one (one step toward a + b in the bit pattern: up in magnitude when e has s's sign) is odd.
    step_toward_sum = tl.where((e > 0) == (s > 0), 1, -1).to(tl.int64)
    inexact_and_even = (e != 0) & ((bits & 1) == 0) & (s - s == 0)
    return tl.where(inexact_and_even, bits + step_toward_sum, bits).to(tl.float64, bitcast=True)


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
def _adagrad_clr(lr, lr_decay, step_counter, ORDER: tl.constexpr):
    """Adagrad's corrected learning rate ``lr / (1 + (step - 1) * lr_decay)`` in fp64 for the step being
    taken; ``lr`` and ``lr_decay`` fp64, ``step_counter`` the fp32 counter before it advances.

    CUDA double order: torch advances the fp32 counter, subtracts 1 in fp32 and contracts the rest into
    an fp64 FMA (Note [CUDA Adagrad order] in adagrad_math.h). CPU order: in double, as torch.optim's
    Python floats.
    """
    if ORDER == CUDA_DOUBLE_ORDER:
        step = step_counter + 1.0
        return lr / _fma((step - 1.0).to(tl.float64), lr_decay, tl.full((), 1.0, tl.float64))
    else:
        step = step_counter.to(tl.float64) + 1.0
        return lr / (1.0 + (step - 1.0) * lr_decay)


@triton.jit
def _adagrad_math(p, g, acc, clr, eps, weight_decay, MAXIMIZE: tl.constexpr, ORDER: tl.constexpr):
    """One Adagrad update with ``clr`` from :func:`_adagrad_clr` (fp64, as ``eps`` and
    ``weight_decay``). Returns ``(p, acc)``, in the order ``ORDER`` (Note [Operation orders]):

    * CPU order: torch's fused CPU kernel: float math, ``clr``, ``eps`` and ``weight_decay`` rounded to
      float once; the FMAs of adagrad_math.h.
    * CUDA double order: torch's fused CUDA kernel (torch >= 2.12, ``adagrad_math`` in
      fused_adagrad_utils.cuh) line for line: the hyperparameters stay fp64, so the weight decay and
      the update are computed in fp64 and rounded once; ``sum + g * g`` and ``sqrt`` in the math dtype.
    """
    dtype = p.dtype
    if MAXIMIZE:
        g = -g
    if ORDER == CUDA_DOUBLE_ORDER:
        if weight_decay != 0:
            g = _fma(p.to(tl.float64), weight_decay, g.to(tl.float64)).to(dtype)  # grad += param * wd, contracted
        acc = _fma(g, g, acc)  # state_sum += grad * grad, contracted
        denom = _sqrt_rn(acc).to(tl.float64) + eps
        p = (p.to(tl.float64) - (clr * g.to(tl.float64)) / denom).to(dtype)
    else:
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
