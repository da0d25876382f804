"""The ``cpu`` backend: the C++ multi-tensor kernels of ``csrc/cpu/`` for CPU tensors.

Available when the compiled extension ``recap_kernels._C`` is loaded and registers the
``recap_kernels::fused_adam_`` and ``recap_kernels::fused_adagrad_`` ops for the CPU. It takes
contiguous float32/bfloat16/float16/float64 tensors; the registry routes every other bucket
(non-contiguous or sparse gradients, complex parameters, ``differentiable=True``) to the torch
backend under ``"auto"`` and refuses it, with that reason, when ``"cpu"`` is explicit.

One op call updates a whole bucket across its param groups: every group's lr, betas, eps and
weight decay travel as per-group lists. Only the switches that are one per call (amsgrad, AdamW's
decoupled decay, maximize) split a bucket whose groups differ in them into one call per run of
groups that agree.
"""

from __future__ import annotations

import torch

from recap_kernels import _ext, _ops  # _ops loads recap_kernels._C (its ops) and registers their fake kernels
from recap_kernels.backends._base import OK, Availability, Bucket, BucketKey, kernel_supports

name = "cpu"
_OPS = ("fused_adam_", "fused_adagrad_")


def available(device: torch.device) -> Availability:
    if device.type != "cpu":
        return Availability(False, f"the cpu backend runs on CPU tensors, not {device.type}")
    module, reason = _ext.load()
    if module is None:
        return Availability(False, reason)
    missing = [op for op in _OPS if not _ext.has_op(op)]
    if missing:
        return Availability(False, f"recap_kernels._C has no CPU kernels for {', '.join(missing)}")
    return OK


def supports(kind: str, key: BucketKey, groups) -> Availability:
    return kernel_supports("the C++ CPU kernels", key, groups)


def _lrs(groups) -> tuple[list[float], list[torch.Tensor | None]]:
    """Each group's lr as the op takes it: a float, or (for a Tensor lr) a placeholder plus the tensor."""
    floats, tensors = [], []
    for group in groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            floats.append(0.0)
            tensors.append(lr)
        else:
            floats.append(float(lr))
            tensors.append(None)
    return floats, tensors


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:

    def switches(group):
        return group["amsgrad"], group["decoupled_weight_decay"], group["maximize"]

    for (amsgrad, decoupled, maximize), groups, sizes, part in bucket.runs(switches):
        lrs, lr_tensors = _lrs(groups)
        _ops.fused_adam_(
            bucket.params[part], bucket.grads[part], bucket.state["exp_avg"][part], bucket.state["exp_avg_sq"][part],
            bucket.state["max_exp_avg_sq"][part] if amsgrad else [], bucket.steps[part], sizes, lrs, lr_tensors,
            [float(g["betas"][0]) for g in groups], [float(g["betas"][1]) for g in groups],
            [float(g["eps"]) for g in groups], [float(g["weight_decay"]) for g in groups],
            amsgrad=amsgrad, decoupled=decoupled, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        )


def adagrad_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    for (maximize,), groups, sizes, part in bucket.runs(lambda group: (group["maximize"],)):
        lrs, lr_tensors = _lrs(groups)
        _ops.fused_adagrad_(
            bucket.params[part], bucket.grads[part], bucket.state["sum"][part], bucket.steps[part], sizes, lrs,
            lr_tensors, [float(g["lr_decay"]) for g in groups], [float(g["eps"]) for g in groups],
            [float(g["weight_decay"]) for g in groups],
            maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        )
