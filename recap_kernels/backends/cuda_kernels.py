"""The ``cuda`` backend: the CUDA C++ multi-tensor kernels of ``csrc/cuda/``.

Available when ``recap_kernels._C`` was built with CUDA, a CUDA device is present, and the
``recap_kernels::fused_adam_`` / ``fused_adagrad_`` ops have CUDA implementations.
"""

from __future__ import annotations

import torch

from recap_kernels import _ext
from recap_kernels.backends._base import Availability, BucketKey

name = "cuda"


def available(device: torch.device) -> Availability:
    if device.type != "cuda":
        return Availability(False, f"the cuda backend runs on CUDA tensors, not {device.type}")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device is available")
    module, reason = _ext.load()
    if module is None:
        return Availability(False, reason)
    if not _ext.build_info().get("cuda_extension"):
        return Availability(False, "recap_kernels._C was built without CUDA kernels")
    return Availability(False, "the cuda backend's step functions are not in this version")


def supports(kind: str, key: BucketKey, groups) -> Availability:
    return available(key.device)
