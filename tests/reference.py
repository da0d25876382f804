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
Adagrad has a fused path on the CPU only: on another device its low-precision reference runs on
CPU copies of the same data (our CUDA Adagrad follows that kernel's operation order).
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
    """Where the reference runs: on ``device``, except low-precision Adagrad off the CPU (see the module doc)."""
    if options.optimizer == "adagrad" and dtype in LOW_PRECISION and torch.device(device).type != "cpu":
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
# torch's fused CUDA Adam, transcribed (the kernels that follow its order are checked against it
# bit for bit on the CPU: the Triton kernels in the interpreter, the CUDA kernels' host emulation)
# ------------------------------------------------------------------------------------------------
# IEEE fp32 arithmetic, as nvcc compiles it, through fp64: the fp64 result rounds to the correctly
# rounded fp32 one for division and square root of fp32 values (torch's vectorized CPU sqrt is off
# by an ulp now and then), and the fp32 product in an FMA is exact.
def _fma32(a, b, c):
    return (a.double() * b.double() + c.double()).float()


def _div32(a, b):
    return (a.double() / b.double()).float()


def _sqrt32(x):
    return torch.sqrt(x.double()).float()


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
