"""The step functions of the C++ backends: one op call per bucket for the ``cpu`` and ``cuda`` backends.

Both backends run the same ops (``recap_kernels::fused_adam_`` / ``fused_adagrad_`` and their
``*_bucket_`` forms, schemas in ``csrc/ops.cpp``); the dispatcher picks the CPU or the CUDA kernel
from the tensors' device. So the Python side of a step is one function per optimizer family, here,
and each backend module adds only its availability.

One op call updates a whole bucket across its param groups: every group's lr, betas, eps and
weight decay travel as per-group lists. Only the switches that are one per call (amsgrad, AdamW's
decoupled decay, maximize) split a bucket whose groups differ in them into one call per run of
groups that agree.

In eager mode a step does not pass the per-parameter lists: each run's params, state and step
lists are bound once per plan into a ``BoundBucket`` (``_ops.bound_bucket``, kept in
``Bucket.scratch``, which lives as long as the plan's Bucket) and each step hands the op only the
gradients, which saves converting four or five Python lists of tensors into C++ per call. Under
``torch.compile`` the list ops run (their fake kernels and mutation annotations are what the
tracer needs; see Note [Bound buckets] in ``csrc/common/bucket.h``).
"""

from __future__ import annotations

import torch

from recap_kernels import _ops
from recap_kernels.backends._base import Bucket

# Whether eager steps use bound buckets (tests switch it off to compare with the list ops).
bind_buckets = True


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


def _bound(bucket: Bucket, key: tuple, part: slice, states: list[list], sizes: list[int]):
    """The BoundBucket of this run of ``bucket``, built on its first step.

    The cached plan hands the backend the same Bucket, with the same parameter, state and step
    lists, every step until it replans (then the Bucket and its ``scratch`` are new). The lists
    themselves are kept next to the object and compared by identity, so a Bucket whose list is
    swapped for another (not what the plan does today) rebuilds it rather than use stale tensors.
    """
    lists = (bucket.params, bucket.steps, *bucket.state.values())
    entry = bucket.scratch.get(key)
    if entry is None or len(entry[0]) != len(lists) or any(a is not b for a, b in zip(entry[0], lists)):
        entry = bucket.scratch[key] = (lists, _ops.bound_bucket(
            bucket.params[part], [tensors[part] for tensors in states], bucket.steps[part], sizes))
    return entry[1]


def _binding() -> bool:
    return bind_buckets and not torch.compiler.is_compiling()


def _on_device(bucket: Bucket, *tensors):
    """GradScaler's grad_scale / found_inf where the bucket's kernels read them: a scaler serves every
    device of a model from one, so buckets on the others get an asynchronous copy (no host sync), as
    torch's fused optimizers do."""
    device = bucket.params[0].device
    return [t if t is None or t.device == device else t.to(device, non_blocking=True) for t in tensors]


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    grad_scale, found_inf = _on_device(bucket, grad_scale, found_inf)

    def switches(group):
        return group["amsgrad"], group["decoupled_weight_decay"], group["maximize"]

    bind = _binding()
    for (amsgrad, decoupled, maximize), groups, sizes, part in bucket.runs(switches):
        lrs, lr_tensors = _lrs(groups)
        hyper = ([float(g["betas"][0]) for g in groups], [float(g["betas"][1]) for g in groups],
                 [float(g["eps"]) for g in groups], [float(g["weight_decay"]) for g in groups])
        flags = {"amsgrad": amsgrad, "decoupled": decoupled, "maximize": maximize, "grad_scale": grad_scale,
                 "found_inf": found_inf}
        states = [bucket.state["exp_avg"], bucket.state["exp_avg_sq"],
                  bucket.state["max_exp_avg_sq"] if amsgrad else []]
        if bind:
            bound = _bound(bucket, ("adam", part.start, part.stop, amsgrad), part, states, sizes)
            _ops.fused_adam_bucket_(bound, bucket.grads[part], lrs, lr_tensors, *hyper, **flags)
        else:
            _ops.fused_adam_(bucket.params[part], bucket.grads[part], *[tensors[part] for tensors in states],
                             bucket.steps[part], sizes, lrs, lr_tensors, *hyper, **flags)


def adagrad_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    grad_scale, found_inf = _on_device(bucket, grad_scale, found_inf)
    bind = _binding()
    for (maximize,), groups, sizes, part in bucket.runs(lambda group: (group["maximize"],)):
        lrs, lr_tensors = _lrs(groups)
        hyper = ([float(g["lr_decay"]) for g in groups], [float(g["eps"]) for g in groups],
                 [float(g["weight_decay"]) for g in groups])
        flags = {"maximize": maximize, "grad_scale": grad_scale, "found_inf": found_inf}
        if bind:
            bound = _bound(bucket, ("adagrad", part.start, part.stop), part, [bucket.state["sum"]], sizes)
            _ops.fused_adagrad_bucket_(bound, bucket.grads[part], lrs, lr_tensors, *hyper, **flags)
        else:
            _ops.fused_adagrad_(bucket.params[part], bucket.grads[part], bucket.state["sum"][part],
                                bucket.steps[part], sizes, lrs, lr_tensors, *hyper, **flags)
