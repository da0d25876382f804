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

import torch

from recap_kernels.backends._base import Availability, Bucket, BucketKey, kernel_supports

name = "triton"

_import_error: str | None = None


def _kernels():
    """The kernels' entry points, imported on first use (importing them imports Triton)."""
    from recap_kernels._triton import ops

    return ops


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
    return kernel_supports("the Triton kernels", key, groups)


def _lr_args(groups) -> tuple[list[float], list, list[bool]]:
    """A group's lr as the ops take it: a float, or a Tensor read on the device (see _triton/ops.py)."""
    is_tensor = [torch.is_tensor(g["lr"]) for g in groups]
    values = [0.0 if t else float(g["lr"]) for g, t in zip(groups, is_tensor)]
    return values, [g["lr"] for g, t in zip(groups, is_tensor) if t], is_tensor


def _run(op_name: str, eager, args, bucket: Bucket, part: slice) -> None:
    if torch.compiler.is_compiling():
        getattr(torch.ops.recap_kernels, op_name)(*args)  # opaque to Dynamo: see _triton/ops.py
    else:
        eager(*args, cache=bucket.cache, name=f"{op_name}{part}")


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    ops = _kernels()

    def flags(group):
        return group["amsgrad"], group["decoupled_weight_decay"], group["maximize"]

    for (amsgrad, decoupled, maximize), groups, sizes, part in bucket.runs(flags):
        hyper = [float(x) for g in groups for x in (*g["betas"], g["eps"], g["weight_decay"])]
        args = (bucket.params[part], bucket.grads[part], bucket.state["exp_avg"][part],
                bucket.state["exp_avg_sq"][part], bucket.state["max_exp_avg_sq"][part] if amsgrad else [],
                bucket.steps[part], sizes, hyper, *_lr_args(groups), amsgrad, decoupled, maximize,
                grad_scale, found_inf)
        _run("triton_adam_", ops.adam_step, args, bucket, part)


def adagrad_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    ops = _kernels()
    for (maximize,), groups, sizes, part in bucket.runs(lambda group: (group["maximize"],)):
        hyper = [float(x) for g in groups for x in (g["lr_decay"], g["eps"], g["weight_decay"])]
        args = (bucket.params[part], bucket.grads[part], bucket.state["sum"][part], bucket.steps[part], sizes,
                hyper, *_lr_args(groups), maximize, grad_scale, found_inf)
        _run("triton_adagrad_", ops.adagrad_step, args, bucket, part)
