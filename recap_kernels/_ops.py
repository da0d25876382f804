"""Typed wrappers over the C++ ops ``torch.ops.recap_kernels.*``, and their fake kernels.

The schemas live in ``csrc/ops.cpp`` (see Note [Fused step ops] there): one call updates every
tensor of a bucket in place, across param groups; ``group_sizes`` splits the tensor lists into
groups, ``hyper`` holds one row of hyperparameters per group and ``lr_tensors`` one optional Tensor
lr per group (the format of :func:`recap_kernels.backends._base.hyper_rows`). The wrappers exist so
that callers name arguments, and so that this module, imported once, registers the fake kernels
that let ``torch.compile`` trace a step (the ops mutate their arguments and return nothing, so a
fake kernel only has to check the call).

:func:`bound_bucket` builds the eager fast path's ``torch.classes.recap_kernels.BoundBucket``
(Note [Bound buckets] in ``csrc/common/bucket.h``).

Importing this module loads ``recap_kernels._C`` if it was built; ``recap_kernels._ext.load()``
says why not otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from recap_kernels import _ext

# Row widths of ``hyper`` (csrc/common/records.h): lr, beta1, beta2, eps, weight_decay / lr, lr_decay, eps, weight_decay.
ADAM_FIELDS = 5
ADAGRAD_FIELDS = 4


def fused_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
    hyper: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    *,
    amsgrad: bool,
    decoupled: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused Adam (``decoupled=False``) or AdamW step over every tensor, in place."""
    torch.ops.recap_kernels.fused_adam_.default(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, hyper, lr_tensors,
        amsgrad=amsgrad, decoupled=decoupled, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
    )


def fused_adagrad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
    hyper: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    *,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused dense Adagrad step over every tensor, in place."""
    torch.ops.recap_kernels.fused_adagrad_.default(
        params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def fused_sparse_adagrad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
    hyper: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    *,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One exact Adagrad step over embedding tables with sparse COO gradients, in place (Note [Table ops])."""
    torch.ops.recap_kernels.fused_sparse_adagrad_.default(
        params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def fused_rowwise_adagrad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
    hyper: Sequence[float],
    lr_tensors: Sequence[Tensor | None],
    *,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One row-wise Adagrad step over embedding tables (sparse or dense gradients, ``state_sums`` of shape
    ``(rows, 1)``), in place (Note [Table ops])."""
    torch.ops.recap_kernels.fused_rowwise_adagrad_.default(
        params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def bound_bucket(
    params: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    state_steps: Sequence[Tensor],
    group_sizes: Sequence[int],
) -> torch.ScriptObject:
    """A ``torch.classes.recap_kernels.BoundBucket`` holding these lists (eager only).

    ``states`` are the state lists in slot order: ``[exp_avgs, exp_avg_sqs]`` (plus ``max_exp_avg_sqs``
    with amsgrad) for Adam, ``[state_sums]`` for Adagrad. Its ``adam_step`` / ``adagrad_step`` take
    the arguments of :func:`fused_adam_` / :func:`fused_adagrad_` after ``group_sizes``, positionally.
    """
    return torch.classes.recap_kernels.BoundBucket(list(params), [list(s) for s in states], list(state_steps),
                                                  list(group_sizes))


def convert_(out: Tensor, src: Tensor) -> None:
    """Test-only: ``out = src`` through the C++ loads and stores (``csrc/include/recap_kernels/convert.h``)."""
    torch.ops.recap_kernels._convert_.default(out, src)


def _check_call(params, others: dict[str, Sequence[Tensor]], state_steps, group_sizes, hyper, fields,
                lr_tensors) -> None:
    """The fake kernels' checks: what the C++ kernels would reject, minus the data."""
    n = len(params)
    for name, tensors in others.items():
        torch._check(len(tensors) == n, lambda: f"{name} must have one tensor per parameter ({n})")
        for t, p in zip(tensors, params):
            torch._check(t.shape == p.shape and t.dtype == p.dtype, lambda: f"{name} must match the parameters")
    torch._check(len(state_steps) == n, lambda: f"state_steps must have one tensor per parameter ({n})")
    torch._check(sum(group_sizes) == n, lambda: f"group_sizes must add up to the {n} parameters")
    torch._check(len(hyper) == fields * len(group_sizes), lambda: f"hyper must have {fields} values per group")
    torch._check(len(lr_tensors) == len(group_sizes), lambda: "lr_tensors must have one entry per group")


# Fake kernels: torch.compile runs these on fake tensors while tracing. The ops return nothing and
# their mutations are declared in the schemas, so there is nothing to compute, only to check.
if _ext.load()[0] is not None:

    @torch.library.register_fake("recap_kernels::fused_adam_")
    def _fused_adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, hyper,
                         lr_tensors, *, amsgrad, decoupled, maximize, grad_scale=None, found_inf=None) -> None:
        others = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
        if amsgrad:
            others["max_exp_avg_sqs"] = max_exp_avg_sqs
        _check_call(params, others, state_steps, group_sizes, hyper, ADAM_FIELDS, lr_tensors)

    @torch.library.register_fake("recap_kernels::fused_adagrad_")
    def _fused_adagrad_fake(params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, *, maximize,
                            grad_scale=None, found_inf=None) -> None:
        _check_call(params, {"grads": grads, "state_sums": state_sums}, state_steps, group_sizes, hyper,
                    ADAGRAD_FIELDS, lr_tensors)

    def _check_table_call(rowwise, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors) -> None:
        """The table ops' checks (Note [Table ops]), minus the data (row indices are checked in C++)."""
        n = len(params)
        for name, tensors in (("grads", grads), ("state_sums", state_sums), ("state_steps", state_steps)):
            torch._check(len(tensors) == n, lambda: f"{name} must have one tensor per table ({n})")
        for p, g, s in zip(params, grads, state_sums):
            torch._check(p.dim() == 2, lambda: "params must be 2-D tables (rows, dim)")
            torch._check(g.shape == p.shape and g.dtype == p.dtype, lambda: "grads must match their tables")
            torch._check(g.is_sparse or rowwise, lambda: "fused_sparse_adagrad_ takes sparse COO gradients")
            expected = (p.shape[0], 1) if rowwise else p.shape
            torch._check(s.shape == expected and s.dtype == p.dtype,
                         lambda: f"state_sums must have shape {tuple(expected)} and their table's dtype")
        torch._check(sum(group_sizes) == n, lambda: f"group_sizes must add up to the {n} tables")
        torch._check(len(hyper) == ADAGRAD_FIELDS * len(group_sizes),
                     lambda: f"hyper must have {ADAGRAD_FIELDS} values per group")
        torch._check(len(lr_tensors) == len(group_sizes), lambda: "lr_tensors must have one entry per group")
        if not rowwise:
            torch._check(all(hyper[g * ADAGRAD_FIELDS + 3] == 0 for g in range(len(group_sizes))),
                         lambda: "weight_decay must be 0 with sparse gradients")

    # A build from before the table ops lacks them (the backends then say so: native.py).
    _register_table_fake = (torch.library.register_fake if _ext.has_op("fused_rowwise_adagrad_")
                            else lambda name: lambda fn: fn)

    @_register_table_fake("recap_kernels::fused_sparse_adagrad_")
    def _fused_sparse_adagrad_fake(params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, *,
                                   maximize, grad_scale=None, found_inf=None) -> None:
        _check_table_call(False, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors)

    @_register_table_fake("recap_kernels::fused_rowwise_adagrad_")
    def _fused_rowwise_adagrad_fake(params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors, *,
                                    maximize, grad_scale=None, found_inf=None) -> None:
        _check_table_call(True, params, grads, state_sums, state_steps, group_sizes, hyper, lr_tensors)

    @torch.library.register_fake("recap_kernels::_convert_")
    def _convert_fake(out, src) -> None:
        torch._check(out.numel() == src.numel(), lambda: "_convert_: out and src must have as many elements")
