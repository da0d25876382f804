"""The ``cpu`` backend: the C++ multi-tensor kernels of ``csrc/cpu/`` for CPU tensors.

Available when the compiled extension ``recap_kernels._C`` is loaded and registers the
``recap_kernels::fused_adam_`` and ``recap_kernels::fused_adagrad_`` ops for the CPU. It takes
contiguous float32/bfloat16/float16/float64 tensors; the registry routes every other bucket
(non-contiguous or sparse gradients, complex parameters, ``differentiable=True``) to the torch
backend under ``"auto"`` and refuses it, with that reason, when ``"cpu"`` is explicit.

The steps themselves (one op call per bucket, bound buckets in eager mode) are shared with the
``cuda`` backend: ``_cpp_steps.py``.
"""

from __future__ import annotations

import torch

from recap_kernels import _ext, _ops  # noqa: F401  _ops loads recap_kernels._C (its ops) and registers their fake kernels
from recap_kernels.backends._base import OK, Availability, BucketKey, kernel_supports
from recap_kernels.backends._cpp_steps import adagrad_step, adam_step  # noqa: F401  (the backend's steps)

name = "cpu"
_OPS = ("fused_adam_", "fused_adagrad_", "fused_adam_bucket_", "fused_adagrad_bucket_")


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
