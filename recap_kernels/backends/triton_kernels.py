"""The ``triton`` backend: Triton kernels for the dense Adam/AdamW and Adagrad steps.

Runs on CUDA, and on CPU only under ``TRITON_INTERPRET=1`` (the test suite). This version of
recap_kernels registers the name but ships no Triton kernels yet, so it reports itself
unavailable with the reason.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from recap_kernels.backends._base import Availability, BucketKey

name = "triton"


def available(device: torch.device) -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return Availability(False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    if device.type not in ("cuda", "cpu"):
        return Availability(False, f"Triton kernels run on CUDA devices, not {device.type}")
    return Availability(False, "this version of recap_kernels has no Triton kernels yet")


def supports(kind: str, key: BucketKey, groups) -> Availability:
    return Availability(False, "this version of recap_kernels has no Triton kernels yet")
