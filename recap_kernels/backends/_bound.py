"""Bound buckets: a run's tensors held from one plan to the next, its gradients gathered at each step.

:func:`bound_bucket` returns the C++ ``torch.classes.recap_kernels.BoundBucket`` (Note [Bound
buckets] in ``csrc/common/bucket.h``) when the extension is loaded, and otherwise a
:class:`PyBoundBucket` with the same methods, written in Python (per-tensor Python at every step:
only the Triton backend runs without the extension, e.g. under ``RECAP_KERNELS_SKIP_EXTENSION=1``).

Both answer ``gather()`` with 0 when every tensor is as the plan saw it (same storage, dtype, shape,
device, contiguous, a dense contiguous gradient of the parameter's dtype and shape) and otherwise
with a nonzero code and ``change()`` saying what differs; ``addresses()`` is the pointer table of
every slot (parameter, gradient, states, step), ``grad_addresses()`` the gradients' addresses as of
the last gather, ``finish_step(grads_written)`` bumps the version counters of what a step wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from recap_kernels import _ext


def bound_bucket(params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], steps: Sequence[Tensor],
                 group_sizes: Sequence[int]):
    """The BoundBucket of these tensors: C++ when the extension is loaded, else :class:`PyBoundBucket`."""
    if _ext.load()[0] is not None:
        from recap_kernels import _ops

        return _ops.bound_bucket(params, states, steps, group_sizes)
    return PyBoundBucket(params, states, steps, group_sizes)


def bump_versions(tensors: Sequence[Tensor]) -> None:
    """Advance each tensor's version counter by one (Note [Version counters] in csrc/common/arguments.h)."""
    if not tensors:
        return
    versions = tuple(t._version + 1 for t in tensors)
    try:
        torch._C._autograd._unsafe_set_version_counter(tuple(tensors), versions)
    except TypeError:  # older torch: one tensor per call
        for t, version in zip(tensors, versions):
            torch._C._autograd._unsafe_set_version_counter(t, version)


class PyBoundBucket:
    """The C++ BoundBucket's checks and bookkeeping, in Python (no extension)."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], steps: Sequence[Tensor],
                 group_sizes: Sequence[int]) -> None:
        self._params = list(params)
        self._states = [list(s) for s in states]
        self._steps = list(steps)
        self._dtype = self._params[0].dtype
        self._device = self._params[0].device
        self._planned = [self._snapshot(i) for i in range(len(self._params))]
        self._grad_addresses = [0] * len(self._params)
        self._change = ""

    def _snapshot(self, i: int) -> tuple:
        p = self._params[i]
        return (tuple(_layout(t) for t in (p, *(s[i] for s in self._states))), _layout(self._steps[i]))

    def gather(self) -> int:
        for i, p in enumerate(self._params):
            if self._snapshot(i) != self._planned[i]:
                return self._changed(i, "a parameter, state or step tensor changed storage, dtype, shape, device "
                                        "or layout")
            g = p.grad
            if g is None:
                return self._changed(i, "the parameter has no gradient")
            if g.layout != torch.strided or g.dtype != self._dtype or g.device != self._device or \
                    g.shape != p.shape or not g.is_contiguous():
                return self._changed(i, "the gradient is not a contiguous dense tensor of the parameter's dtype, "
                                        "shape and device")
            self._grad_addresses[i] = g.data_ptr()
        self._change = ""
        return 0

    def _changed(self, i: int, what: str) -> int:
        self._change = f"params[{i}]: {what}"
        return i + 1

    def change(self) -> str:
        return self._change

    def addresses(self) -> Tensor:
        slots = [self._params, self._grad_addresses, *self._states, self._steps]
        return torch.tensor([[a if isinstance(a, int) else a.data_ptr() for a in slot] for slot in slots],
                            dtype=torch.int64)

    def grad_addresses(self) -> Tensor:
        return torch.tensor(self._grad_addresses, dtype=torch.int64)

    def finish_step(self, grads_written: bool) -> None:
        written = self._params + [t for s in self._states for t in s] + self._steps
        if grads_written:
            written += [p.grad for p in self._params]
        bump_versions(written)

    def __len__(self) -> int:
        return len(self._params)


def _layout(t: Tensor) -> tuple:
    """What the kernels were planned for: storage address, dtype, shape, device, contiguity."""
    return t.data_ptr(), t.dtype, t.shape, t.device, t.is_contiguous()
