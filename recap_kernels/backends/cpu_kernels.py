"""The ``cpu`` backend: the C++ multi-tensor kernels of ``csrc/cpu/`` for CPU tensors.

Available when the compiled extension ``recap_kernels._C`` is loaded and registers the
``recap_kernels::fused_adam_`` and ``recap_kernels::fused_adagrad_`` ops for the CPU.
"""

from __future__ import annotations

import torch

from recap_kernels import _ext
from recap_kernels.backends._base import Availability, BucketKey

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
    return Availability(False, "the cpu backend's step functions are not in this version")


def supports(kind: str, key: BucketKey, groups) -> Availability:
    return available(key.device)
