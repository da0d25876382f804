"""The Triton steps: a bucket's runs bound to device tables, launched; and the same as torch custom ops.

Eager steps (the ``triton`` backend, ``backends/triton_kernels.py``): :func:`bind_run` builds, once
per plan, a run's BoundBucket (which gathers the gradients at each step, Note [Bound buckets] in
csrc/common/bucket.h) and its :class:`~multi_tensor.TensorTable` from the bucket's addresses;
:func:`step_run` uploads what changed since the last step (the gradients' addresses, the
hyperparameter rows) and launches the update and the step counters.

Traced steps (``torch.compile``): Dynamo cannot trace Triton launches that reach tensors through a
pointer table, so the same launches run behind ``recap_kernels::triton_adam_`` and
``recap_kernels::triton_adagrad_`` (declared with the tensors they mutate), which take the lists
and keep their tables in a small process-wide cache keyed by the tensors' addresses. Keep lr in a
tensor under ``torch.compile`` so that a scheduler changing it causes no recompilation.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton.language as tl
from torch import Tensor

from recap_kernels.backends._base import Bucket, Run
from recap_kernels.backends._bound import bound_bucket
from recap_kernels._triton import adagrad, adam, multi_tensor

# Storage dtype -> (Triton storage dtype, Triton math dtype): fp32 math for every storage but fp64.
_TL_DTYPES = {
    torch.float32: (tl.float32, tl.float32),
    torch.bfloat16: (tl.bfloat16, tl.float32),
    torch.float16: (tl.float16, tl.float32),
    torch.float64: (tl.float64, tl.float64),
}

_COMPILED_TABLES: OrderedDict = OrderedDict()  # the tables of steps run through the custom ops


def _launch(kind: str, table: multi_tensor.TensorTable, dtype: torch.dtype, switches: tuple, grad_scale,
            found_inf) -> None:
    storage, math = _TL_DTYPES[dtype]
    if kind == "adam":
        amsgrad, decoupled, maximize = switches
        adam.adam_launch(table, dtype=storage, math_dtype=math, amsgrad=amsgrad, decoupled=decoupled,
                         maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
    else:
        (maximize,) = switches
        adagrad.adagrad_launch(table, dtype=storage, math_dtype=math, maximize=maximize, grad_scale=grad_scale,
                               found_inf=found_inf)


def bind_run(kind: str, bucket: Bucket, run: Run) -> None:
    """``run.bound`` and ``run.table`` for this plan."""
    params = bucket.params[run.part]
    device = bucket.key.device
    run.bound = bound_bucket(params, bucket.run_states(kind, run), bucket.steps[run.part], run.sizes)
    run.table = multi_tensor.TensorTable(run.bound.addresses(), [p.numel() for p in params], run.sizes,
                                         multi_tensor.launch_config(device), device)


def step_run(kind: str, bucket: Bucket, run: Run, *, grad_scale, found_inf) -> None:
    """One step of a bound run, after its ``bound.gather()`` succeeded."""
    table = run.table
    table.update_grads(run.bound.grad_addresses())
    table.set_hyper(*run.hyper)
    _launch(kind, table, bucket.key.dtype, run.switches, grad_scale, found_inf)
    run.bound.finish_step(grad_scale is not None)


def _compiled_step(kind, slots, group_sizes, hyper, lr_tensors, switches, grad_scale, found_inf) -> None:
    device = slots[0][0].device
    table = multi_tensor.table_for(_COMPILED_TABLES, slots, group_sizes, device)
    table.set_hyper(hyper, lr_tensors)
    _launch(kind, table, slots[0][0].dtype, switches, grad_scale, found_inf)


@torch.library.custom_op(
    "recap_kernels::triton_adam_",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
)
def triton_adam_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], steps: list[Tensor], group_sizes: list[int], hyper: list[float],
    lr_tensors: list[Tensor | None], amsgrad: bool, decoupled: bool, maximize: bool, grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    if params:
        slots = [params, grads, exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if amsgrad else []), steps]
        _compiled_step("adam", slots, group_sizes, hyper, lr_tensors, (amsgrad, decoupled, maximize), grad_scale,
                       found_inf)


@triton_adam_.register_fake
def _(*args, **kwargs) -> None:
    # In-place on its arguments, nothing returned: tracing needs no shapes from it.
    return None


@torch.library.custom_op(
    "recap_kernels::triton_adagrad_", mutates_args=("params", "grads", "state_sums", "steps"),
)
def triton_adagrad_(
    params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], steps: list[Tensor],
    group_sizes: list[int], hyper: list[float], lr_tensors: list[Tensor | None], maximize: bool,
    grad_scale: Tensor | None, found_inf: Tensor | None,
) -> None:
    if params:
        _compiled_step("adagrad", [params, grads, state_sums, steps], group_sizes, hyper, lr_tensors, (maximize,),
                       grad_scale, found_inf)


@triton_adagrad_.register_fake
def _(*args, **kwargs) -> None:
    return None
