"""The one place where references and the equivalence harness live.

Every backend is checked the same way: :func:`check_equivalence` trains ``torch.optim`` (the
reference) and ``recap_kernels.optim`` with the requested backend on the same fresh random
parameters and gradients, with the same arguments, and asserts that every parameter and every
state tensor (torch's state key names) match. New backends join the matrix by registering
themselves: the tests parametrize over ``available_backends()``.

What the matrix covers (DESIGN.md, "Numerical equivalence"): float and Tensor lr, weight decay,
AdamW's decoupled decay, amsgrad, maximize, Adagrad's lr_decay and initial_accumulator_value,
odd sizes with an empty tensor, a parameter that never has a gradient and one that skips steps,
three param groups with different hyperparameters, and resuming from the other
implementation's ``state_dict`` in both directions.

For bf16/fp16 storage the reference is torch's fused path (fp32 math, one rounding per store),
so both sides get ``fused=True`` and results must agree to one unit in the last place. torch's
Adagrad has a fused CUDA path since torch 2.12 (our CUDA and Triton Adagrad follow its operation
order on CUDA there); with an older torch its only fused Adagrad is the CPU one, and on CUDA its
low-precision reference runs on CPU copies of the same data (our kernels then follow that kernel's
order on every device).

torch's fused CUDA kernels are also transcribed here, operation for operation
(:func:`torch_cuda_opmath_adam`, :func:`torch_cuda_fused_adagrad`), so the kernels that follow them
are checked bit for bit on a machine without a GPU: the CUDA kernels' host emulation and the Triton
kernels in the interpreter.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from recap_kernels import optim

# (reference class, class under test) per optimizer family.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer]]] = {
    "adam": (torch.optim.Adam, optim.Adam),
    "adamw": (torch.optim.AdamW, optim.AdamW),
    "adagrad": (torch.optim.Adagrad, optim.Adagrad),
}

# Odd sizes: a single element, a tail shorter than any vector width, one past a power of two,
# an empty tensor, a 2-D matrix, and a plain small vector.
SHAPES: tuple[tuple[int, ...], ...] = ((1,), (3,), (4097,), (0,), (33, 65), (130,))
STEPS = 12
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def fma_operands(n: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """``(a, b, c, exact)``: fp64 operands for FMA tests (products over a wide range of magnitudes, half
    of them cancelling ``c`` so the product's low bits decide) and ``a * b + c`` rounded once, from
    rational arithmetic."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(n, generator=gen) * 8)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    c[::2] = -(a[::2] * b[::2]) * (1 + 1e-9 * c[::2])
    exact = [float(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    return a, b, c, exact


def adam_hyper(lrs, beta1s, beta2s, epss, weight_decays) -> list[float]:
    """The ops' ``hyper`` rows (``lr, beta1, beta2, eps, weight_decay`` per group) from per-field lists."""
    return [float(x) for row in zip(lrs, beta1s, beta2s, epss, weight_decays) for x in row]


def adagrad_hyper(lrs, lr_decays, epss, weight_decays) -> list[float]:
    """The ops' ``hyper`` rows (``lr, lr_decay, eps, weight_decay`` per group) from per-field lists."""
    return [float(x) for row in zip(lrs, lr_decays, epss, weight_decays) for x in row]


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` tolerances: torch's defaults for fp32/fp64, one ulp of the dtype below that."""
    if dtype in LOW_PRECISION:
        return {"rtol": torch.finfo(dtype).eps, "atol": 1e-5}
    return {}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Options:
    """One row of the option matrix: an optimizer family and its keyword arguments."""

    id: str
    optimizer: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def make_kwargs(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Fresh tensors per optimizer (a Tensor lr must not be shared between the two sides).

        A Tensor lr is float64 for float64 parameters, as a user's would be: torch's non-fused
        paths compute with the lr tensor's precision.
        """
        lr_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return {k: v.to(lr_dtype, copy=True) if torch.is_tensor(v) else v for k, v in self.kwargs.items()}


OPTION_MATRIX: tuple[Options, ...] = (
    Options("adam-default", "adam"),
    Options("adam-wd", "adam", {"weight_decay": 0.1}),
    Options("adam-amsgrad-wd", "adam", {"amsgrad": True, "weight_decay": 0.05}),
    Options("adam-maximize", "adam", {"maximize": True, "weight_decay": 0.02}),
    Options("adam-lr-tensor", "adam", {"lr": torch.tensor(3e-3)}),
    Options("adam-betas-eps", "adam", {"betas": (0.8, 0.95), "eps": 1e-6}),
    Options("adamw-default", "adamw"),
    Options("adamw-wd", "adamw", {"weight_decay": 0.1}),
    Options("adamw-amsgrad-maximize", "adamw", {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    Options("adamw-lr-tensor", "adamw", {"lr": torch.tensor(2e-3), "weight_decay": 0.1}),
    Options("adagrad-default", "adagrad"),
    Options("adagrad-lr-decay", "adagrad", {"lr_decay": 0.05}),
    Options("adagrad-init-acc", "adagrad", {"initial_accumulator_value": 0.1, "eps": 1e-6}),
    Options("adagrad-wd-maximize", "adagrad", {"weight_decay": 0.1, "maximize": True}),
    Options("adagrad-lr-tensor", "adagrad", {"lr": torch.tensor(0.05)}),
)


def _group_overrides(family: str, default_lr) -> list[dict[str, Any]]:
    """Hyperparameters of groups 1 and 2 (group 0 uses the optimizer defaults)."""
    lr = default_lr if default_lr is not None else {"adagrad": 1e-2}.get(family, 1e-3)
    if family == "adagrad":
        return [{"lr": lr * 0.5, "lr_decay": 0.01}, {"lr": lr * 2, "eps": 1e-8}]
    return [{"lr": lr * 0.5, "weight_decay": 0.03}, {"lr": lr * 2, "betas": (0.85, 0.99)}]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def make_params(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device="cpu", seed: int = 0
) -> list[torch.Tensor]:
    """Fresh random parameters (never zeros), one per shape, on a scale that differs per tensor."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        scale = 10.0 ** (i % 3 - 1)  # 0.1, 1, 10
        params.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device))
    return params


def make_grads(params: Sequence[torch.Tensor], steps: int, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Per step, one gradient per parameter; ``None`` where a parameter has no gradient.

    The last parameter never gets a gradient (it must get no state), and the second skips every
    third step (its step count and bias corrections must lag the others').
    """
    gen = torch.Generator().manual_seed(seed)
    sequence = []
    for step in range(steps):
        grads: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            if i == len(params) - 1 or (i == 1 and step % 3 == 2):
                grads.append(None)
                continue
            scale = 10.0 ** ((i + step) % 5 - 3)  # 1e-3 .. 10: tiny and large gradients
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            grads.append(g.to(p.dtype).to(p.device))
        sequence.append(grads)
    return sequence


def split_groups(params: list[torch.Tensor], overrides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three param groups: every third parameter, group ``i`` taking ``overrides[i - 1]``."""
    groups = [{"params": params[0::3]}]
    for i, extra in enumerate(overrides, start=1):
        groups.append({"params": params[i::3], **extra})
    return groups


# ------------------------------------------------------------------------------------------------
# Running and comparing
# ------------------------------------------------------------------------------------------------
def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads_per_step) -> None:
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


def roundtrip_state_dict(opt: torch.optim.Optimizer, device) -> dict:
    """``state_dict`` through ``torch.save`` / ``torch.load``, as a checkpoint travels."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, map_location=device, weights_only=True)


def assert_optimizer_close(
    ref_opt: torch.optim.Optimizer,
    ref_params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Parameters and every state tensor, by torch's state key names, match the reference."""
    tol = {**tolerances(dtype), "check_device": False}  # the reference may have run on CPU copies
    for i, (ref_p, p) in enumerate(zip(ref_params, params)):
        torch.testing.assert_close(p, ref_p, **tol, msg=lambda m, i=i: f"param {i}: {m}")
        ref_state, state = ref_opt.state.get(ref_p, {}), opt.state.get(p, {})
        assert set(state) == set(ref_state), f"param {i}: state keys {sorted(state)} != {sorted(ref_state)}"
        for key, ref_value in ref_state.items():
            value = state[key]
            if key == "step":  # torch may keep it on the host as its default float dtype
                value, ref_value = value.cpu().double(), ref_value.cpu().double()
                torch.testing.assert_close(value, ref_value, msg=lambda m, i=i: f"param {i} step: {m}")
            else:
                torch.testing.assert_close(value, ref_value, **tol, msg=lambda m, i=i, k=key: f"param {i} {k}: {m}")


OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "lr_decay", "initial_accumulator_value")


def rounded_hyperparameters(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any],
                            dtype: torch.dtype) -> dict[str, Any]:
    """``kwargs`` with every hyperparameter, defaults included, rounded to ``dtype``.

    torch's fused CUDA Adam (since torch 2.11), and our kernels that follow it, compute with the
    hyperparameters rounded to the math dtype: betas of 0.9 / 0.999 become 0.899999976 /
    0.999000013, which moves exp_avg_sq by up to 1.3e-5 relative after a step, far beyond fp32's
    default tolerance against torch's double-precision paths. With values that fp32 represents
    exactly, both sides compute with the same numbers and the default tolerances apply again.
    """
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name in HYPERPARAMETERS}

    def rounded(x):
        if torch.is_tensor(x):
            return x.to(dtype).to(x.dtype)
        if isinstance(x, float):
            return float(torch.tensor(x, dtype=dtype))
        if isinstance(x, tuple):
            return tuple(rounded(v) for v in x)
        return x

    return {k: rounded(v) if k in HYPERPARAMETERS else v for k, v in {**defaults, **kwargs}.items()}


def fused_cuda_hyperparameters(options: Options, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype torch's fused CUDA Adam rounds hyperparameters to (float32 since torch 2.11, for
    fp32/bf16/fp16 storage), which our CUDA kernels follow; None where nothing is rounded. Pass it as
    ``hyperparameters_in`` so the reference computes with the same values."""
    from recap_kernels._torch_numerics import torch_cuda_adam_opmath

    if options.optimizer != "adagrad" and dtype != torch.float64 and torch_cuda_adam_opmath():
        return torch.float32
    return None


def build_pair(
    backend: str, options: Options, dtype: torch.dtype, device, shapes, seed: int = 0,
    hyperparameters_in: torch.dtype | None = None,
) -> tuple[OptimizerFactory, OptimizerFactory]:
    """Factories ``(make_reference(params), make_tested(params))`` with identical arguments.

    ``hyperparameters_in``: round every hyperparameter to this dtype first (rounded_hyperparameters).
    """
    ref_cls, test_cls = OPTIMIZERS[options.optimizer]

    def kwargs():
        kw = options.make_kwargs(dtype)
        if hyperparameters_in is not None:
            kw = rounded_hyperparameters(ref_cls, kw, hyperparameters_in)
        if dtype in LOW_PRECISION:
            kw["fused"] = True  # the low-precision reference: fp32 math, one rounding
        return kw

    def make(cls, params, **extra):
        kw = kwargs()
        overrides = _group_overrides(options.optimizer, kw.get("lr"))
        if hyperparameters_in is not None:
            overrides = [{k: v for k, v in rounded_hyperparameters(ref_cls, o, hyperparameters_in).items() if k in o}
                         for o in overrides]
        return cls(split_groups(params, overrides), **kw, **extra)

    return (lambda params: make(ref_cls, params)), (lambda params: make(test_cls, params, backend=backend))


def reference_device(options: Options, dtype: torch.dtype, device) -> torch.device:
    """Where the reference runs: on ``device``, except low-precision Adagrad off the CPU with a torch that
    has no fused CUDA Adagrad (see the module doc)."""
    from recap_kernels._torch_numerics import torch_cuda_fused_adagrad

    if (options.optimizer == "adagrad" and dtype in LOW_PRECISION and torch.device(device).type != "cpu"
            and not torch_cuda_fused_adagrad()):
        return torch.device("cpu")
    return torch.device(device)


def check_equivalence(
    backend: str,
    options: Options,
    dtype: torch.dtype,
    *,
    device="cpu",
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    steps: int = STEPS,
    resume: str | None = None,
    hyperparameters_in: torch.dtype | None = None,
) -> torch.optim.Optimizer:
    """Train reference and tested optimizer side by side and assert they end equal.

    ``resume``: ``None`` (the tested optimizer runs every step), ``"from_torch"`` (torch runs the
    first half, its ``state_dict`` is loaded into the tested optimizer for the second half) or
    ``"to_torch"`` (the tested optimizer runs the first half and torch continues from its state).
    ``hyperparameters_in``: see :func:`rounded_hyperparameters`.
    Returns the tested optimizer (for extra checks such as ``backends_used()``).
    """
    make_ref, make_tested = build_pair(backend, options, dtype, device, shapes,
                                       hyperparameters_in=hyperparameters_in)
    init = make_params(shapes, dtype, device)
    grads = make_grads(init, steps)

    ref_device = reference_device(options, dtype, device)
    ref_params = [p.to(ref_device, copy=True).requires_grad_() for p in init]
    ref_opt = make_ref(ref_params)
    train(ref_opt, ref_params, [[None if g is None else g.to(ref_device) for g in step] for step in grads])

    params = [p.clone().requires_grad_() for p in init]
    half = steps // 2
    if resume is not None and ref_device.type != torch.device(device).type:
        raise ValueError(f"resume={resume!r} needs torch's reference on {device}, which has none for {options.id}")
    if resume is None:
        tested = last = make_tested(params)
        train(tested, params, grads)
    elif resume == "from_torch":
        first = make_ref(params)
        train(first, params, grads[:half])
        tested = last = make_tested(params)
        tested.load_state_dict(roundtrip_state_dict(first, device))
        train(tested, params, grads[half:])
    elif resume == "to_torch":
        tested = make_tested(params)
        train(tested, params, grads[:half])
        last = make_ref(params)
        last.load_state_dict(roundtrip_state_dict(tested, device))
        train(last, params, grads[half:])
    else:
        raise ValueError(f"resume must be None, 'from_torch' or 'to_torch', not {resume!r}")

    assert_optimizer_close(ref_opt, ref_params, last, params, dtype)
    return tested


# ------------------------------------------------------------------------------------------------
# torch's fused CUDA Adam and Adagrad, transcribed (the kernels that follow their order are checked
# against them bit for bit on the CPU: the Triton kernels in the interpreter, the CUDA kernels' host
# emulation)
# ------------------------------------------------------------------------------------------------
# IEEE fp32 arithmetic, as nvcc compiles it, through fp64: the fp64 result rounds to the correctly
# rounded fp32 one for division and square root of fp32 values (torch's vectorized CPU sqrt is off
# by an ulp now and then), and the fp32 product in an FMA is exact, its sum rounded to odd in fp64
# then rounds to the fp32 FMA's result.
def _fma32(a, b, c):
    return _add_round_to_odd(a.double() * b.double(), c.double()).float()


def _two_sum(a, b):
    """``(s, e)``: fp64 ``s = a + b`` rounded to nearest and ``s + e == a + b`` exactly (Knuth's TwoSum)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def _split(a):
    """fp64 ``a == hi + lo`` exactly, each half with at most 26 significant bits (Veltkamp)."""
    scaled = a * 134217729.0  # 2 ** 27 + 1
    hi = scaled - (scaled - a)
    return hi, a - hi


def _add_round_to_odd(a, b):
    """fp64 ``a + b`` rounded to odd: an exact sum as it is, any other to its neighbour with an odd last bit.

    Rounding to odd in fp64 and then to nearest in a format of at most 51 bits rounds once (Boldo and
    Melquiond).
    """
    s, e = _two_sum(a, b)
    bits = s.view(torch.int64)
    toward_sum = torch.where((e > 0) == (s > 0), 1, -1)  # one step up in magnitude when e has s's sign
    inexact_and_even = (e != 0) & (bits & 1 == 0) & torch.isfinite(s)
    return torch.where(inexact_and_even, bits + toward_sum, bits).view(torch.float64)


def _fma64(a, b, c):
    """fp64 ``a * b + c`` rounded once, as a GPU's DFMA (or C's ``fma``) computes it, from fp64 tensors.

    Boldo and Melquiond's emulation (IEEE TC 2008): the product as an exact sum of two doubles
    (Dekker), ``c`` plus its rounded part as another (TwoSum), the remainders added rounded to odd,
    the whole rounded once. Exact for finite results without underflow (tests/test_cuda_ops.py
    checks it against rational arithmetic). Where it is not finite (inf or NaN operands, or ``a`` or
    ``b`` beyond 2^996, whose split overflows), the plain arithmetic's result.
    """
    a, b, c = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b, c))
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    product = a * b
    product_error = ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    sum_hi, sum_lo = _two_sum(c, product)
    exact = sum_hi + _add_round_to_odd(sum_lo, product_error)
    return torch.where(torch.isfinite(exact), exact, product + c)


def _div32(a, b):
    return (a.double() / b.double()).float()


def _sqrt32(x):
    return torch.sqrt(x.double()).float()


def _sqrt64(x):
    """IEEE fp64 square root: numpy's (the CPU's instruction); torch's vectorized CPU one is off by an
    ulp now and then in fp64 too."""
    import numpy as np

    return torch.from_numpy(np.sqrt(x.numpy()))


def torch_cuda_opmath_adam(param, grads, *, dtype, lr, betas, eps, weight_decay, amsgrad, decoupled, maximize,
                            grad_scale=None):
    """torch's fused CUDA Adam since torch 2.11 (``adam_math`` in fused_adam_utils.cuh), line for line.

    fp32 on the CPU, with nvcc's contractions (the weight decays) as FMAs. Returns the final
    ``(param, exp_avg, exp_avg_sq, max_exp_avg_sq)``, stored in ``dtype`` after every step.
    """
    f32 = torch.float32
    lr, beta1, beta2, eps, weight_decay = (torch.tensor(float(x), dtype=f32) for x in (lr, *betas, eps, weight_decay))
    p = param.to(dtype)
    m, v, v_max = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for step, g in enumerate(grads, 1):
        bias_correction1 = 1 - torch.tensor(beta1.item() ** step).float()  # powf, up to its last ulp
        bias_correction2_sqrt = _sqrt32(1 - torch.tensor(beta2.item() ** step).float())
        step_size = _div32(lr, bias_correction1)
        p32, g32, m32, v32, v_max32 = (t.float() for t in (p, g.to(dtype), m, v, v_max))
        if grad_scale is not None:
            g32 = _div32(g32, grad_scale)
        if maximize:
            g32 = -g32
        if weight_decay != 0:
            if decoupled:
                p32 = _fma32(-(lr * weight_decay), p32, p32)
            else:
                g32 = _fma32(p32, weight_decay, g32)
        m32 = _fma32(beta1, m32, _fma32(-beta1, g32, g32))
        g2 = g32 * g32
        v32 = _fma32(beta2, v32, _fma32(-beta2, g2, g2))
        if amsgrad:
            v_max32 = torch.where(v_max32 < v32, v32, v_max32)
        denom = _div32(_sqrt32(v_max32 if amsgrad else v32), bias_correction2_sqrt) + eps
        p32 = p32 - _div32(step_size * m32, denom)
        p, m, v, v_max = (t.to(dtype) for t in (p32, m32, v32, v_max32))
    return p, m, v, v_max


def torch_cuda_fused_adagrad(param, grads, *, dtype, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                             initial_accumulator_value=0.0, maximize=False, grad_scale=None, found_inf=None):
    """torch's fused CUDA Adagrad (torch >= 2.12: ``adagrad_math`` and ``FusedAdagradMathFunctor`` in
    fused_adagrad_utils.cuh, driven by ``_fused_adagrad`` in torch/optim/adagrad.py), line for line.

    ``param``: the initial parameter; ``grads``: one gradient per step (as handed to the kernel, so
    scaled under AMP; None: the parameter has no gradient that step and is left alone). The math
    dtype is float32 for float32/bfloat16/float16 storage, float64 for float64, every
    hyperparameter a double; nvcc's contractions are FMAs (Note [CUDA Adagrad order] in
    csrc/include/recap_kernels/adagrad_math.h). ``lr``: a float or a Tensor (torch reads a CUDA
    Tensor lr as float32, a CPU one with ``item<double>()``: either way the value it holds).
    ``grad_scale``: GradScaler's scale (a float32 Tensor), every step; ``found_inf``: one value per step
    (0 or 1), or None.

    Returns the final ``(param, state_sum, step, grad)`` in their stored dtypes (``step`` the float32
    counter; ``grad`` the last step's gradient as the kernel leaves it: unscaled under AMP).
    """
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lr_double = float(lr)
    p = param.to(dtype)
    state_sum = torch.full_like(p, initial_accumulator_value)
    step = torch.tensor(0.0, dtype=torch.float32)
    grad = None
    for k, g in enumerate(grads):
        grad = None if g is None else g.to(dtype)
        if g is None:
            continue
        inf = None if found_inf is None else torch.tensor(float(found_inf[k]), dtype=torch.float32)
        step = step + 1  # torch._foreach_add_(state_steps, 1), before the kernel
        if inf is None or inf != 1:  # if (found_inf_ptr && *found_inf_ptr == 1) return;
            # const auto denom = 1 + (*step_count - 1) * lr_decay;  (float - 1, then double, contracted)
            denom = _fma64((step - 1).double(), lr_decay, 1.0).item()
            corrected_lr = lr_double / denom  # double (Python's: a float over a Tensor is a reciprocal times it)
            p_m, g_m, sum_m = (t.to(math_dtype) for t in (p, grad, state_sum))
            if grad_scale is not None:
                g_m = (g_m.double() / grad_scale.double()).to(math_dtype)  # grad /= double(*grad_scale_ptr)
            grad_to_store = g_m
            if maximize:
                g_m = -g_m
            if weight_decay != 0:
                g_m = _fma64(p_m.double(), weight_decay, g_m.double()).to(math_dtype)  # grad += param * wd
            if math_dtype == torch.float32:
                sum_m = _fma32(g_m, g_m, sum_m)  # state_sum += grad * grad
                root = _sqrt32(sum_m)
            else:
                sum_m = _fma64(g_m, g_m, sum_m)
                root = _sqrt64(sum_m)
            # param = param - corrected_lr * grad / (std::sqrt(state_sum) + eps);  sqrt in opmath, the rest double
            p_m = (p_m.double() - corrected_lr * g_m.double() / (root.double() + eps)).to(math_dtype)
            p, state_sum = p_m.to(dtype), sum_m.to(dtype)
            if grad_scale is not None:
                grad = grad_to_store.to(dtype)
        if inf is not None:
            step = step - inf  # torch._foreach_sub_(state_steps, found_inf), after the kernel
    return p, state_sum, step, grad


# Param groups of the bit-for-bit Adagrad checks: lr (float and Tensor), lr_decay, weight decay and
# eps differ per group. (torch's Adagrad takes initial_accumulator_value from its constructor only.)
# With lr_decay 0.1 or 0.02, 1 + 7 * lr_decay rounded once (an FMA) and twice differ: from the 8th
# step on, float64 results see whether the lr decay is contracted.
ADAGRAD_BITS_GROUPS: tuple[dict[str, Any], ...] = (
    {"lr": 0.05, "lr_decay": 0.1},
    {"lr": torch.tensor(0.03), "weight_decay": 0.1, "eps": 1e-6},
    {"lr": 0.02, "lr_decay": 0.02, "weight_decay": 0.02},
)
ADAGRAD_BITS_INITIAL_ACCUMULATOR = 0.1


@dataclass
class AdagradBitsCase:
    """Data for checking an Adagrad bit for bit against torch's fused CUDA Adagrad (or its transcription).

    One group per entry of ``sizes`` with the hyperparameters of ``ADAGRAD_BITS_GROUPS``, sums starting
    at ``ADAGRAD_BITS_INITIAL_ACCUMULATOR``; the second parameter of group 0 is a view at an odd offset
    (no 128-bit path), the second of group 1 skips every third step; under ``amp`` the gradients are
    scaled and step 4 overflows (found_inf = 1).
    """

    dtype: torch.dtype
    init: list[list[torch.Tensor]]
    grads: list[list[list[torch.Tensor | None]]]  # [step][group][param], unscaled
    maximize: bool
    amp: bool
    scale: torch.Tensor | None
    found_inf: list[float] | None

    @classmethod
    def make(cls, dtype, *, sizes, steps, maximize=False, amp=False, seed=11) -> AdagradBitsCase:
        gen = torch.Generator().manual_seed(seed)
        init = [[torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in group] for group in sizes]
        grads = [[[None if (g == 1 and i == 1 and k % 3 == 2) else
                   (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 10.0 ** (k % 4 - 2)).to(dtype)
                   for i, p in enumerate(params)] for g, params in enumerate(init)] for k in range(steps)]
        return cls(dtype, init, grads, maximize, amp, torch.tensor(512.0) if amp else None,
                   [float(k == 4) for k in range(steps)] if amp else None)

    def kernel_grad(self, g):
        """The gradient as the optimizer's kernel gets it: scaled under AMP."""
        return g if g is None or self.scale is None else g * self.scale

    def run(self, make_optimizer, device) -> tuple[torch.optim.Optimizer, list[tuple]]:
        """Runs ``make_optimizer(groups, maximize=..., initial_accumulator_value=...)`` on ``device``;
        returns it and, per parameter, ``(param, sum, step, grad)`` on the CPU."""
        params = []
        for g, tensors in enumerate(self.init):
            group = []
            for i, t in enumerate(tensors):
                if g == 0 and i == 1:
                    view = torch.zeros(t.numel() + 1, dtype=self.dtype, device=device)[1:]
                    group.append(view.copy_(t).requires_grad_())
                else:
                    group.append(t.to(device, copy=True).requires_grad_())
            params.append(group)
        groups = [{"params": ps, **{k: v.to(device) if torch.is_tensor(v) else v for k, v in hp.items()}}
                  for ps, hp in zip(params, ADAGRAD_BITS_GROUPS)]
        opt = make_optimizer(groups, maximize=self.maximize, initial_accumulator_value=ADAGRAD_BITS_INITIAL_ACCUMULATOR)
        for k, step_grads in enumerate(self.grads):
            for ps, gs in zip(params, step_grads):
                for p, g in zip(ps, gs):
                    p.grad = None if g is None else self.kernel_grad(g).to(device)
            if self.amp:
                opt.grad_scale = self.scale.to(device)
                opt.found_inf = torch.tensor(self.found_inf[k], device=device)
            opt.step()
        results = []
        for p in (p for ps in params for p in ps):
            state = opt.state[p]
            results.append((p.detach().cpu(), state["sum"].cpu(), state["step"].cpu().float(),
                            None if p.grad is None else p.grad.cpu()))
        return opt, results

    def torch_cuda_fused_adagrad(self) -> list[tuple]:
        """:func:`torch_cuda_fused_adagrad` per parameter, with its group's hyperparameters."""
        expected = []
        for g, (tensors, hp) in enumerate(zip(self.init, ADAGRAD_BITS_GROUPS)):
            for i, t in enumerate(tensors):
                grads = [self.kernel_grad(step[g][i]) for step in self.grads]
                expected.append(torch_cuda_fused_adagrad(
                    t, grads, dtype=self.dtype, maximize=self.maximize, grad_scale=self.scale, found_inf=self.found_inf,
                    initial_accumulator_value=ADAGRAD_BITS_INITIAL_ACCUMULATOR, **hp))
        return expected


def assert_same_adagrad_bits(got: list[tuple], want: list[tuple], amp: bool) -> None:
    """Per parameter, ``(param, sum, step, grad)`` the same bits (the gradient only under AMP, where the
    kernel writes it back unscaled)."""
    assert len(got) == len(want)
    for n, (have, expected) in enumerate(zip(got, want)):
        for name, h, w in zip(("param", "sum", "step", "grad"), have, expected):
            if name == "grad" and not amp:
                continue
            assert h.dtype == w.dtype and torch.equal(h, w), (
                f"param {n} {name}: max difference {(h.double() - w.double()).abs().max().item()}")


# ------------------------------------------------------------------------------------------------
# Embedding tables: sparse gradients and row-wise Adagrad
# ------------------------------------------------------------------------------------------------
# Exact sparse Adagrad has torch.optim.Adagrad itself as its reference. Row-wise Adagrad has none in
# torch: it computes what FBGEMM's EXACT_ROWWISE_ADAGRAD computes (torchrec's Python RowWiseAdagrad
# squares the row mean of the gradient instead of taking the row mean of its square, and fails with
# weight decay), transcribed here in float64, one row at a time, written for reading, not speed.


def sparse_rows_grad(rows: int, dim: int, indices: Sequence[int], *, dtype=torch.float32, seed: int = 3,
                     device="cpu") -> torch.Tensor:
    """An uncoalesced sparse COO gradient of a ``(rows, dim)`` table (sparse_dim 1, as
    ``EmbeddingBag(sparse=True)`` makes them): one random row of values per entry of ``indices``,
    repeats included."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(len(indices), dim, generator=gen).to(dtype)
    index = torch.tensor(list(indices), dtype=torch.long).reshape(1, -1)
    return torch.sparse_coo_tensor(index, values, (rows, dim), check_invariants=False).to(device)


def summed_rows(grad: torch.Tensor) -> dict[int, torch.Tensor]:
    """Row -> the gradient of that row in float64: a dense gradient's every row, a sparse one's
    distinct rows with duplicate entries summed (what torch's coalesce computes)."""
    if not grad.is_sparse:
        return {r: row.double() for r, row in enumerate(grad.detach().cpu())}
    rows: dict[int, torch.Tensor] = {}
    indices = grad._indices()[0].cpu().tolist()
    values = grad._values().detach().cpu().double()
    for r, v in zip(indices, values):
        rows[r] = rows[r] + v if r in rows else v.clone()
    return rows


def rowwise_adagrad_reference(param: torch.Tensor, state_sum: torch.Tensor, step: torch.Tensor, grad: torch.Tensor,
                              *, lr: float, lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
                              maximize: bool = False) -> None:
    """One row-wise Adagrad step in place: ``param`` ``(rows, dim)``, ``state_sum`` ``(rows, 1)``,
    ``step`` 0-d, ``grad`` dense or sparse COO (rows summed first). Per row with a gradient ``g``
    (negated with maximize), in float64, results rounded once to the tensors' dtypes::

        step += 1;  clr = lr / (1 + (step - 1) * lr_decay)
        g += weight_decay * w                      (L2, rows with a gradient only)
        sum += mean(g * g)                         (over the row)
        w -= clr * g / (sqrt(sum) + eps)

    Rows without a gradient (sparse) are left as they are, bit for bit.
    """
    step += 1
    clr = lr / (1 + (float(step) - 1) * lr_decay)
    for r, g in summed_rows(grad).items():
        w = param[r].double()
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + weight_decay * w
        s = state_sum[r].double() + (g * g).mean()
        state_sum[r] = s.to(state_sum.dtype)
        param[r] = (w - clr * g / (s.sqrt() + eps)).to(param.dtype)


def sparse_adagrad_reference(param: torch.Tensor, state_sum: torch.Tensor, step: torch.Tensor, grad: torch.Tensor,
                             *, lr: float, lr_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False) -> None:
    """One exact Adagrad step with a sparse gradient in place: torch.optim.Adagrad's sparse branch
    (``_single_tensor_adagrad``) in float64, results rounded once to the tensors' dtypes::

        step += 1;  clr = lr / (1 + (step - 1) * lr_decay)
        sum += g * g                               (g: the row's entries summed, negated with maximize)
        w -= clr * g / (sqrt(sum) + eps)

    What the table ops compute for bfloat16/float16 tables (float math, one rounding per store), where
    torch's own step rounds every intermediate to the table's dtype and sums a row's duplicate entries
    in it, in its sort's order: several ulps away from this now and then. Rows without a gradient are
    left as they are, bit for bit.
    """
    step += 1
    clr = lr / (1 + (float(step) - 1) * lr_decay)
    for r, g in summed_rows(grad).items():
        g = -g if maximize else g
        s = state_sum[r].double() + g * g
        state_sum[r] = s.to(state_sum.dtype)
        param[r] = (param[r].double() - clr * g / (s.sqrt() + eps)).to(param.dtype)
