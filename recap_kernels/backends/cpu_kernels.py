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

from itertools import groupby

import torch

from recap_kernels import _ext, _ops  # _ops loads recap_kernels._C (its ops) and registers their fake kernels
from recap_kernels.backends._base import CONTIGUOUS, OK, Availability, Bucket, BucketKey

name = "cpu"
_OPS = ("fused_adam_", "fused_adagrad_")
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    if key.layout != CONTIGUOUS:
        return Availability(False, f"the C++ CPU kernels take contiguous dense tensors, not {key.layout} ones")
    if key.dtype not in _SUPPORTED_DTYPES:
        return Availability(False, f"the C++ CPU kernels take float32/bfloat16/float16/float64, not {key.dtype}")
    if any(group["differentiable"] for group in groups):
        return Availability(False, "differentiable=True needs autograd through the update: the torch backend")
    return OK


def _calls(bucket: Bucket, switches):
    """``(switch values, groups, group sizes, tensor span)`` per run of consecutive groups that agree.

    The span is ``None`` when one call takes the whole bucket (the usual case: no list is copied).
    """
    runs = [(value, list(members)) for value, members in
            groupby(zip(bucket.groups, bucket.spans), key=lambda item: switches(item[0]))]
    if len(runs) == 1:
        yield runs[0][0], bucket.groups, [hi - lo for lo, hi in bucket.spans], None
        return
    for value, members in runs:
        groups = [group for group, _ in members]
        sizes = [hi - lo for _, (lo, hi) in members]
        yield value, groups, sizes, (members[0][1][0], members[-1][1][1])


def _take(tensors: list, span: tuple[int, int] | None) -> list:
    return tensors if span is None else tensors[span[0]:span[1]]


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

    # Only amsgrad groups have max_exp_avg_sq, so that list is indexed on its own.
    max_exp_avg_sqs = bucket.state.get("max_exp_avg_sq", [])
    amsgrad_done = 0
    for (amsgrad, decoupled, maximize), groups, sizes, span in _calls(bucket, switches):
        maxima = []
        if amsgrad:
            count = sum(sizes)
            maxima = max_exp_avg_sqs if count == len(max_exp_avg_sqs) else \
                max_exp_avg_sqs[amsgrad_done:amsgrad_done + count]
            amsgrad_done += count
        lrs, lr_tensors = _lrs(groups)
        _ops.fused_adam_(
            _take(bucket.params, span), _take(bucket.grads, span), _take(bucket.state["exp_avg"], span),
            _take(bucket.state["exp_avg_sq"], span), maxima, _take(bucket.steps, span), sizes, lrs, lr_tensors,
            [float(g["betas"][0]) for g in groups], [float(g["betas"][1]) for g in groups],
            [float(g["eps"]) for g in groups], [float(g["weight_decay"]) for g in groups],
            amsgrad=amsgrad, decoupled=decoupled, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        )


def adagrad_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    for (maximize,), groups, sizes, span in _calls(bucket, lambda group: (group["maximize"],)):
        lrs, lr_tensors = _lrs(groups)
        _ops.fused_adagrad_(
            _take(bucket.params, span), _take(bucket.grads, span), _take(bucket.state["sum"], span),
            _take(bucket.steps, span), sizes, lrs, lr_tensors, [float(g["lr_decay"]) for g in groups], [float(g["eps"]) for g in groups],
            [float(g["weight_decay"]) for g in groups],
            maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        )
