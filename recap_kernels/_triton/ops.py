"""The Triton steps as torch custom ops, so ``torch.compile`` sees one opaque call per bucket.

Eager steps call :func:`adam_step` / :func:`adagrad_step` directly with the optimizer's own table
cache. Under ``torch.compile`` the same functions run behind ``recap_kernels::triton_adam_`` and
``recap_kernels::triton_adagrad_`` (declared with the tensors they mutate), because Dynamo cannot
trace Triton launches that reach tensors through a pointer table; the op keeps its tables in a
small process-wide cache keyed by the tensors' addresses instead.

A group's learning rate reaches the kernel as a float (``lr_values``) or, when the group's ``lr``
is a Tensor, through that tensor (``lr_tensors``, with ``lr_is_tensor`` saying which): keep lr in
a tensor under ``torch.compile`` so that a scheduler changing it causes no recompilation.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton.language as tl
from torch import Tensor

from recap_kernels._triton import adagrad, adam, multi_tensor

_COMPILED_TABLES: OrderedDict = OrderedDict()  # the cache of tables for steps run through the ops
_COMPILED_TABLE_LIMIT = 64


def _lrs(lr_values: list[float], lr_tensors: list[Tensor], lr_is_tensor: list[bool]) -> list:
    tensors = iter(lr_tensors)
    return [next(tensors) if is_tensor else value for value, is_tensor in zip(lr_values, lr_is_tensor)]


# Storage dtype -> (Triton storage dtype, Triton math dtype): fp32 math for every storage but fp64.
_TL_DTYPES = {
    torch.float32: (tl.float32, tl.float32),
    torch.bfloat16: (tl.bfloat16, tl.float32),
    torch.float16: (tl.float16, tl.float32),
    torch.float64: (tl.float64, tl.float64),
}


def adam_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], steps: list[Tensor], group_sizes: list[int], hyper: list[float],
    lr_values: list[float], lr_tensors: list[Tensor], lr_is_tensor: list[bool],
    amsgrad: bool, decoupled: bool, maximize: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
    cache: dict | None = None, name: str = "adam",
) -> None:
    """One fused Adam/AdamW launch over every tensor; ``hyper`` is ``(beta1, beta2, eps, wd)`` per group.

    ``cache[name]`` holds the tables (the optimizer's bucket cache; the process-wide one if None).
    """
    slots = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + [steps]
    table = multi_tensor.table_for(_COMPILED_TABLES if cache is None else cache, name, slots, group_sizes,
                                   params[0].device, limit=_COMPILED_TABLE_LIMIT if cache is None else None)
    table.refresh_hyper([tuple(hyper[4 * i:4 * i + 4]) for i in range(len(group_sizes))],
                        _lrs(lr_values, lr_tensors, lr_is_tensor))
    dtype, math_dtype = _TL_DTYPES[params[0].dtype]
    adam.adam_launch(table, dtype=dtype, math_dtype=math_dtype,
                     amsgrad=amsgrad, decoupled=decoupled, maximize=maximize, grad_scale=grad_scale,
                     found_inf=found_inf)


def adagrad_step(
    params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], steps: list[Tensor],
    group_sizes: list[int], hyper: list[float], lr_values: list[float], lr_tensors: list[Tensor],
    lr_is_tensor: list[bool], maximize: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
    cache: dict | None = None, name: str = "adagrad",
) -> None:
    """One fused Adagrad launch over every tensor; ``hyper`` is ``(lr_decay, eps, wd)`` per group."""
    slots = [params, grads, state_sums, steps]
    table = multi_tensor.table_for(_COMPILED_TABLES if cache is None else cache, name, slots, group_sizes,
                                   params[0].device, limit=_COMPILED_TABLE_LIMIT if cache is None else None)
    table.refresh_hyper([tuple(hyper[3 * i:3 * i + 3]) for i in range(len(group_sizes))],
                        _lrs(lr_values, lr_tensors, lr_is_tensor))
    dtype, math_dtype = _TL_DTYPES[params[0].dtype]
    adagrad.adagrad_launch(table, dtype=dtype, math_dtype=math_dtype,
                           maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


@torch.library.custom_op(
    "recap_kernels::triton_adam_",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
)
def triton_adam_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], steps: list[Tensor], group_sizes: list[int], hyper: list[float],
    lr_values: list[float], lr_tensors: list[Tensor], lr_is_tensor: list[bool],
    amsgrad: bool, decoupled: bool, maximize: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
) -> None:
    adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_sizes, hyper, lr_values,
              lr_tensors, lr_is_tensor, amsgrad, decoupled, maximize, grad_scale, found_inf)


@triton_adam_.register_fake
def _(*args, **kwargs) -> None:
    # In-place on its arguments, nothing returned: tracing needs no shapes from it.
    return None


@torch.library.custom_op(
    "recap_kernels::triton_adagrad_", mutates_args=("params", "grads", "state_sums", "steps"),
)
def triton_adagrad_(
    params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], steps: list[Tensor],
    group_sizes: list[int], hyper: list[float], lr_values: list[float], lr_tensors: list[Tensor],
    lr_is_tensor: list[bool], maximize: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
) -> None:
    adagrad_step(params, grads, state_sums, steps, group_sizes, hyper, lr_values, lr_tensors, lr_is_tensor,
                 maximize, grad_scale, found_inf)


@triton_adagrad_.register_fake
def _(*args, **kwargs) -> None:
    return None
