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

In eager mode a step does not pass the per-parameter lists: each run's params, state and step
lists are bound once per plan into a ``CpuBucket`` (``_ops.cpu_bucket``, kept in
``Bucket.scratch``, which lives as long as the plan's Bucket) and each step hands the op only the
gradients, which saves converting four or five Python lists of tensors into C++ per call. Under
``torch.compile`` the list ops run (their fake kernels and mutation annotations are what the
tracer needs; see Note [Bound buckets] in ``csrc/cpu/bucket.h``).
"""

from __future__ import annotations

import torch

from recap_kernels import _ext, _ops  # _ops loads recap_kernels._C (its ops) and registers their fake kernels
from recap_kernels.backends._base import OK, Availability, Bucket, BucketKey, kernel_supports

name = "cpu"
_OPS = ("fused_adam_", "fused_adagrad_", "fused_adam_bucket_", "fused_adagrad_bucket_")
# Whether eager steps use bound buckets (tests switch it off to compare with the list ops).
_bind_buckets = True


def _extension_verdict() -> Availability:
    module, reason = _ext.load()
    if module is None:
        return Availability(False, reason)
    missing = [op for op in _OPS if not _ext.has_op(op)]
    if missing:
        return Availability(False, f"recap_kernels._C has no CPU kernels for {', '.join(missing)}")
    return OK


# Decided once, at import: whether the extension is there cannot change within a process, and a
# plain module constant is what torch.compile can trace through (the loader's import machinery is not).
_EXTENSION = _extension_verdict()


def available(device: torch.device) -> Availability:
    if device.type != "cpu":
        return Availability(False, f"the cpu backend runs on CPU tensors, not {device.type}")
    return _EXTENSION


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


def _bound(bucket: Bucket, key: tuple, part: slice, states: list[list], sizes: list[int]):
    """The CpuBucket of this run of ``bucket``, built on its first step.

    The cached plan hands the backend the same Bucket, with the same parameter, state and step
    lists, every step until it replans (then the Bucket and its ``scratch`` are new). The lists
    themselves are kept next to the object and compared by identity, so a Bucket whose list is
    swapped for another (not what the plan does today) rebuilds it rather than use stale tensors.
    """
    lists = (bucket.params, bucket.steps, *bucket.state.values())
    entry = bucket.scratch.get(key)
    if entry is None or len(entry[0]) != len(lists) or any(a is not b for a, b in zip(entry[0], lists)):
        entry = bucket.scratch[key] = (lists, _ops.cpu_bucket(
            bucket.params[part], [tensors[part] for tensors in states], bucket.steps[part], sizes))
    return entry[1]


def _binding() -> bool:
    return _bind_buckets and not torch.compiler.is_compiling()


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:

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
