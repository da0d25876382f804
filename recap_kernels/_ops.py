"""Typed wrappers over the C++ ops ``torch.ops.recap_kernels.*``, and their fake kernels.

The schemas live in ``csrc/ops.cpp`` (see Note [Fused step ops] there): one call updates every
tensor of a bucket in place, across param groups; ``group_sizes`` splits the tensor lists into
groups, and each per-group list (``lrs``, ``beta1s``, ...) has one entry per group. The wrappers
exist so that callers name arguments, and so that this module, imported once, registers the fake
kernels that let ``torch.compile`` trace a step (the ops mutate their arguments and return
nothing, so a fake kernel only has to accept the call).

The ``*_bucket_`` ops are the same steps on a :func:`bound_bucket`, an object that holds the
per-parameter lists that do not change between steps (params, state, step counters, group sizes)
on the C++ side, so a call converts only the gradients (Note [Bound buckets] in
``csrc/common/bucket.h``). They are for eager mode only: the bucket's tensors are invisible to
tracing, they have no fake kernels, and compiled code calls the list ops.

Importing this module loads ``recap_kernels._C`` if it was built; :data:`LOADED` says whether it
was, and :data:`LOAD_ERROR` why not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from recap_kernels import _ext

_module, LOAD_ERROR = _ext.load()
LOADED = _module is not None

FUSED_ADAM = "recap_kernels::fused_adam_"
FUSED_ADAGRAD = "recap_kernels::fused_adagrad_"
CONVERT = "recap_kernels::_convert_"
FUSED_ADAM_BUCKET = "recap_kernels::fused_adam_bucket_"
FUSED_ADAGRAD_BUCKET = "recap_kernels::fused_adagrad_bucket_"


def fused_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
    lrs: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    beta1s: Sequence[float],
    beta2s: Sequence[float],
    epss: Sequence[float],
    weight_decays: Sequence[float],
    *,
    amsgrad: bool,
    decoupled: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused Adam (``decoupled=False``) or AdamW step over every tensor, in place."""
    torch.ops.recap_kernels.fused_adam_.default(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, lrs, lr_tensors,
        beta1s, beta2s, epss, weight_decays, amsgrad=amsgrad, decoupled=decoupled, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def fused_adagrad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
    lrs: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    lr_decays: Sequence[float],
    epss: Sequence[float],
    weight_decays: Sequence[float],
    *,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused dense Adagrad step over every tensor, in place."""
    torch.ops.recap_kernels.fused_adagrad_.default(
        params, grads, state_sums, state_steps, group_sizes, lrs, lr_tensors, lr_decays, epss, weight_decays,
        maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
    )


@functools.cache
def _eager_entry(name: str):
    """The C++ entry point of ``torch.ops.recap_kernels.<name>.default``, for the eager-only ``*_bucket_`` ops.

    Calling an op whose schema takes a class object through its OpOverload first walks every
    argument in Python looking for the FakeScriptObjects that tracing makes (torch/_ops.py,
    ``_must_dispatch_in_python``): about 240 ns a tensor, 1.2 ms for 5,000 gradients, more than the
    list conversion the bucket saves. Eager calls never hold one, and the overload's ``_op`` is what
    its ``__call__`` calls when there is none: the C++ dispatcher, Python modes included.
    """
    overload = getattr(torch.ops.recap_kernels, name).default
    return getattr(overload, "_op", overload)


def bound_bucket(
    params: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
) -> torch.ScriptObject:
    """A ``torch.classes.recap_kernels.BoundBucket`` holding these lists for the ``*_bucket_`` ops (eager only).

    ``states`` are the state lists in the order the list op takes them: ``[exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs]`` (the last ``[]`` unless amsgrad) for Adam, ``[state_sums]`` for Adagrad.
    The object keeps the tensors (not their data pointers) until it is dropped; build a new one
    when any of the tensor objects change.
    """
    return torch.classes.recap_kernels.BoundBucket(list(params), [list(s) for s in states], list(state_steps),
                                                  list(group_sizes))


def fused_adam_bucket_(
    bucket: torch.ScriptObject,
    grads: Sequence[Tensor],
    lrs: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    beta1s: Sequence[float],
    beta2s: Sequence[float],
    epss: Sequence[float],
    weight_decays: Sequence[float],
    *,
    amsgrad: bool,
    decoupled: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`fused_adam_` on ``bucket``'s params, state and step lists with these gradients (eager only)."""
    _eager_entry("fused_adam_bucket_")(
        bucket, grads, lrs, lr_tensors, beta1s, beta2s, epss, weight_decays, amsgrad=amsgrad, decoupled=decoupled,
        maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
    )


def fused_adagrad_bucket_(
    bucket: torch.ScriptObject,
    grads: Sequence[Tensor],
    lrs: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    lr_decays: Sequence[float],
    epss: Sequence[float],
    weight_decays: Sequence[float],
    *,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`fused_adagrad_` on ``bucket``'s params, state-sum and step lists with these gradients (eager only)."""
    _eager_entry("fused_adagrad_bucket_")(
        bucket, grads, lrs, lr_tensors, lr_decays, epss, weight_decays, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf,
    )


def convert_(out: Tensor, src: Tensor) -> None:
    """Test-only: ``out = src`` through the C++ loads and stores (``csrc/include/recap_kernels/convert.h``)."""
    torch.ops.recap_kernels._convert_.default(out, src)


def _check_bucket(params, others: dict[str, Sequence[Tensor]], state_steps, group_sizes, per_group) -> None:
    """The fake kernels' checks: what the C++ kernels would reject, minus the data."""
    n = len(params)
    for name, tensors in others.items():
        torch._check(len(tensors) == n, lambda: f"{name} must have one tensor per parameter ({n})")
        for t, p in zip(tensors, params):
            torch._check(t.shape == p.shape and t.dtype == p.dtype, lambda: f"{name} must match the parameters")
    torch._check(len(state_steps) == n, lambda: f"state_steps must have one tensor per parameter ({n})")
    torch._check(sum(group_sizes) == n, lambda: f"group_sizes must add up to the {n} parameters")
    for name, values in per_group.items():
        torch._check(len(values) == len(group_sizes), lambda: f"{name} must have one entry per group")


# Fake kernels: torch.compile runs these on fake tensors while tracing. The ops return nothing and
# their mutations are declared in the schemas, so there is nothing to compute, only to check.
if LOADED:

    @torch.library.register_fake(FUSED_ADAM)
    def _fused_adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, lrs,
                         lr_tensors, beta1s, beta2s, epss, weight_decays, *, amsgrad, decoupled, maximize,
                         grad_scale=None, found_inf=None) -> None:
        others = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
        if amsgrad:
            others["max_exp_avg_sqs"] = max_exp_avg_sqs
        _check_bucket(params, others, state_steps, group_sizes,
                      {"lrs": lrs, "lr_tensors": lr_tensors, "beta1s": beta1s, "beta2s": beta2s, "epss": epss,
                       "weight_decays": weight_decays})

    @torch.library.register_fake(FUSED_ADAGRAD)
    def _fused_adagrad_fake(params, grads, state_sums, state_steps, group_sizes, lrs, lr_tensors, lr_decays, epss,
                            weight_decays, *, maximize, grad_scale=None, found_inf=None) -> None:
        _check_bucket(params, {"grads": grads, "state_sums": state_sums}, state_steps, group_sizes,
                      {"lrs": lrs, "lr_tensors": lr_tensors, "lr_decays": lr_decays, "epss": epss,
                       "weight_decays": weight_decays})

    @torch.library.register_fake(CONVERT)
    def _convert_fake(out, src) -> None:
        torch._check(out.numel() == src.numel(), lambda: "_convert_: out and src must have as many elements")
