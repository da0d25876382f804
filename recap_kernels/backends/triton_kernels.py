"""The ``triton`` backend: Triton kernels for the dense Adam/AdamW and Adagrad steps.

Runs CUDA tensors, and CPU tensors only under ``TRITON_INTERPRET=1`` (the test suite). It takes
contiguous float32/bfloat16/float16/float64 tensors; the registry routes every other bucket
(non-contiguous or sparse gradients, complex parameters, ``differentiable=True``) to the torch
backend under ``"auto"`` and refuses it, with that reason, when ``"triton"`` is explicit.

A bucket whose param groups differ in ``amsgrad``, ``maximize`` or decoupled weight decay
(compile-time switches of the kernel) takes one launch per combination; everything else that
differs per group (lr, betas, eps, weight decay, lr_decay) is read from the group's table row.
"""

from __future__ import annotations

import importlib.util
import os
from itertools import groupby

import torch

from recap_kernels.backends._base import CONTIGUOUS, OK, Availability, Bucket, BucketKey

name = "triton"

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_import_error: str | None = None


def _kernels():
    """The kernel modules, imported on first use (importing them imports Triton)."""
    from recap_kernels._triton import adagrad, adam, multi_tensor

    return adam, adagrad, multi_tensor


def _importable() -> Availability:
    global _import_error
    if _import_error is None:
        try:
            _kernels()
            _import_error = ""
        except Exception as exc:  # a broken Triton install must become a reason, not a crash
            _import_error = f"the Triton kernels failed to import: {exc!r}"
    return Availability(not _import_error, _import_error)


def available(device: torch.device) -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
    elif device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return Availability(False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    else:
        return Availability(False, f"Triton kernels run on CUDA devices, not {device.type}")
    return _importable()


def supports(kind: str, key: BucketKey, groups) -> Availability:
    if key.layout != CONTIGUOUS:
        return Availability(False, f"the Triton kernels take contiguous dense tensors, not {key.layout} ones")
    if key.dtype not in _SUPPORTED_DTYPES:
        return Availability(False, f"the Triton kernels take float32/bfloat16/float16/float64, not {key.dtype}")
    if any(group["differentiable"] for group in groups):
        return Availability(False, "differentiable=True needs autograd through the update: the torch backend")
    return OK


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]


def _partitions(bucket: Bucket, flags):
    """``(flag values, slices)``: consecutive groups sharing the kernel's compile-time switches."""
    spans = [(flags(group), group, span) for group, span in zip(bucket.groups, bucket.spans)]
    for value, members in groupby(spans, key=lambda item: item[0]):
        members = list(members)
        if len(members) == len(spans):  # the usual case: the whole bucket in one launch
            yield value, bucket.groups, [hi - lo for lo, hi in bucket.spans], slice(0, len(bucket))
        else:
            lo, hi = members[0][2][0], members[-1][2][1]
            yield value, [m[1] for m in members], [b - a for _, _, (a, b) in members], slice(lo, hi)


def _math_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    adam, _, multi_tensor = _kernels()
    dtype = _tl_dtype(bucket.key.dtype)
    math_dtype = _math_dtype(bucket.key.dtype)

    def flags(group):
        return group["amsgrad"], group["decoupled_weight_decay"], group["maximize"]

    for (amsgrad, decoupled, maximize), groups, sizes, part in _partitions(bucket, flags):
        slots = [bucket.params[part], bucket.grads[part], bucket.state["exp_avg"][part],
                 bucket.state["exp_avg_sq"][part]]
        if amsgrad:
            slots.append(bucket.state["max_exp_avg_sq"][part])
        slots.append(bucket.steps[part])
        table = multi_tensor.table_for(bucket.cache, f"adam{part}", slots, sizes, bucket.key.device)
        table.refresh_hyper(
            [(float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]), float(g["weight_decay"])) for g in groups],
            [g["lr"] for g in groups],
        )
        adam.adam_launch(table, dtype=dtype, math_dtype=math_dtype, amsgrad=amsgrad, decoupled=decoupled,
                         maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def adagrad_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    _, adagrad, multi_tensor = _kernels()
    dtype = _tl_dtype(bucket.key.dtype)
    math_dtype = _math_dtype(bucket.key.dtype)

    for (maximize,), groups, sizes, part in _partitions(bucket, lambda group: (group["maximize"],)):
        slots = [bucket.params[part], bucket.grads[part], bucket.state["sum"][part], bucket.steps[part]]
        table = multi_tensor.table_for(bucket.cache, f"adagrad{part}", slots, sizes, bucket.key.device)
        table.refresh_hyper(
            [(float(g["lr_decay"]), float(g["eps"]), float(g["weight_decay"])) for g in groups],
            [g["lr"] for g in groups],
        )
        adagrad.adagrad_launch(table, dtype=dtype, math_dtype=math_dtype, maximize=maximize,
                               grad_scale=grad_scale, found_inf=found_inf)
