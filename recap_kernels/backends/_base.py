"""What every backend module provides, and what the optimizers hand to it.

A backend is a module-level object with a ``name``, an ``available(device)`` check, a
``supports(kind, key, groups)`` check, and one step function per optimizer family
(``adam_step``, ``adagrad_step``) taking a :class:`Bucket`. The optimizer classes know nothing
else about kernels: they group tensors into buckets, ask the registry which backend runs each
bucket, and call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what can."""


class Availability(NamedTuple):
    """``(ok, reason)``: ``reason`` is empty when ``ok`` and says why not otherwise."""

    ok: bool
    reason: str = ""


OK = Availability(True, "")


# Memory layouts of a parameter and its gradient, as buckets see them.
CONTIGUOUS = "contiguous"  # parameter and gradient both contiguous: every kernel takes these
STRIDED = "strided"  # a non-contiguous parameter or gradient: the torch backend's job
SPARSE = "sparse"  # a sparse COO gradient


class BucketKey(NamedTuple):
    """Tensors that can share one launch: same device, same dtype, same memory layout."""

    device: torch.device
    dtype: torch.dtype
    layout: str

    @property
    def sparse(self) -> bool:
        return self.layout == SPARSE

    def __str__(self) -> str:
        return f"{self.layout} {str(self.dtype).removeprefix('torch.')} tensors on {self.device}"


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def kernel_supports(kernels: str, key: BucketKey, groups) -> Availability:
    """What every kernel backend takes: contiguous dense float tensors, without autograd.

    ``kernels`` names them in the reason (e.g. "the Triton kernels").
    """
    if key.layout != CONTIGUOUS:
        return Availability(False, f"{kernels} take contiguous dense tensors, not {key.layout} ones")
    if key.dtype not in KERNEL_DTYPES:
        return Availability(False, f"{kernels} take float32/bfloat16/float16/float64, not {key.dtype}")
    if any(group["differentiable"] for group in groups):
        return Availability(False, "differentiable=True needs autograd through the update: the torch backend")
    return OK


def layout_of(p: Tensor, grad: Tensor) -> str:
    if grad.is_sparse:
        return SPARSE
    return CONTIGUOUS if p.is_contiguous() and grad.is_contiguous() else STRIDED


@dataclass
class Bucket:
    """The tensors of one optimizer that step together, across param groups.

    Tensors are ordered group by group, so each group owns one contiguous span
    ``spans[i] = (start, stop)`` of every per-tensor list; ``groups[i]`` is that param group's
    dict (lr, betas, weight decay, flags) exactly as the optimizer holds it.
    ``state`` maps torch's state key names (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    ``sum``) to per-tensor lists, aligned with ``params`` (``None`` where a tensor's group has no
    such state, e.g. ``max_exp_avg_sq`` without amsgrad); ``steps`` are the ``state["step"]`` tensors.
    ``cache`` persists across steps for this optimizer and bucket key: backends keep their device
    tables there and rebuild them when the tensors change. ``scratch`` lives exactly as long as this
    Bucket object (a new plan makes new Buckets): what a backend derives from this bucket's
    parameter, state and step lists, which the cached plan keeps while it lives.
    """

    key: BucketKey
    groups: list[dict[str, Any]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    state: dict[str, list[Tensor]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    scratch: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.params)

    def runs(self, switches):
        """``(switch values, groups, group sizes, tensor slice)`` per run of consecutive groups that agree.

        ``switches(group)`` returns what a kernel compiles in (amsgrad, decoupled decay,
        maximize): groups that differ in it need separate launches. Usually one run covers the
        whole bucket.
        """
        for value, members in groupby(zip(self.groups, self.spans), key=lambda item: switches(item[0])):
            members = list(members)
            yield (value, [group for group, _ in members], [hi - lo for _, (lo, hi) in members],
                   slice(members[0][1][0], members[-1][1][1]))

    def per_group(self):
        """Yield ``(group, params, grads, steps, state)`` for each group's span."""
        for group, (lo, hi) in zip(self.groups, self.spans):
            yield group, self.params[lo:hi], self.grads[lo:hi], self.steps[lo:hi], {
                k: v[lo:hi] for k, v in self.state.items()
            }


class Backend(Protocol):
    name: str

    def available(self, device: torch.device) -> Availability:
        """Whether this backend can run on ``device`` at all (libraries present, kernels built)."""

    def supports(self, kind: str, key: BucketKey, groups: list[dict[str, Any]]) -> Availability:
        """Whether it can run ``kind`` ("adam" | "adagrad") for this bucket with these groups' options."""

    def adam_step(self, bucket: Bucket, *, grad_scale: Tensor | None, found_inf: Tensor | None) -> None: ...

    def adagrad_step(self, bucket: Bucket, *, grad_scale: Tensor | None, found_inf: Tensor | None) -> None: ...
