"""The ``cuda`` backend: the CUDA C++ multi-tensor kernels of ``csrc/cuda/`` for CUDA tensors.

Available when ``recap_kernels._C`` was built with CUDA (``setup.py``), its ops have CUDA kernels,
a CUDA device is present, and the extension has code for that device's architecture (machine
code for it, or PTX of an older one that the driver compiles). It takes contiguous
float32/bfloat16/float16/float64 tensors; the registry routes every other bucket (non-contiguous or
sparse gradients, complex parameters, ``differentiable=True``) to the torch backend under
``"auto"`` and refuses it, with that reason, when ``"cuda"`` is explicit.

A step is one launch per bucket (plus one that advances the step counters), whatever the number
of tensors and param groups (Note [Multi-tensor launch] in ``csrc/cuda/multi_tensor.cuh``): the
per-tensor addresses live in a device table that is uploaded only when they change, and the
per-group hyperparameters travel as kernel arguments. ``step``, a Tensor ``lr`` on the device and
GradScaler's ``grad_scale`` / ``found_inf`` are read by the kernels: no host synchronisation, so
``capturable`` steps can be captured in a CUDA graph.

The steps themselves are the ``cpu`` backend's (``_cpp_steps.py``): the same ops, whose CUDA
kernels the dispatcher picks for CUDA tensors.
"""

from __future__ import annotations

import functools

import torch

from recap_kernels import _ext, _ops  # noqa: F401  _ops loads recap_kernels._C (its ops) and registers their fake kernels
from recap_kernels.backends._base import OK, Availability, BucketKey, kernel_supports
from recap_kernels.backends._cpp_steps import adagrad_step, adam_step  # noqa: F401  (the backend's steps)

name = "cuda"
_OPS = ("fused_adam_", "fused_adagrad_", "fused_adam_bucket_", "fused_adagrad_bucket_")


def has_cuda_kernel(op: str) -> bool:
    """Whether ``recap_kernels::<op>`` has a kernel registered for the CUDA dispatch key."""
    return _ext.has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"recap_kernels::{op}", "CUDA")


def compiled_archs() -> list[str]:
    """The ``TORCH_CUDA_ARCH_LIST`` entries this build compiled (``"9.0+PTX"``: sm_90 code plus PTX)."""
    return [a for a in _ext.build_info().get("cuda_archs", []) if a]


def arch_supported(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a GPU of ``capability`` runs this build: machine code for its major architecture at or
    below its minor version (sm_80 code runs on sm_86), or PTX of an architecture at or below it."""
    for arch in archs:
        spec = arch.upper().removesuffix("+PTX")
        try:
            major, minor = (int(x) for x in spec.split(".")[:2])
        except ValueError:
            continue
        if arch.upper().endswith("+PTX") and (major, minor) <= capability:
            return True
        if major == capability[0] and minor <= capability[1]:
            return True
    return False


def _extension_verdict() -> Availability:
    module, reason = _ext.load()
    if module is None:
        return Availability(False, reason)
    if not _ext.build_info().get("cuda_extension"):
        notes = "; ".join(_ext.build_info().get("notes", [])) or "RECAP_KERNELS_BUILD_CUDA=0 or no nvcc at build time"
        return Availability(False, f"recap_kernels._C was built without CUDA kernels ({notes})")
    missing = [op for op in _OPS if not has_cuda_kernel(op)]
    if missing:
        return Availability(False, f"recap_kernels._C has no CUDA kernels for {', '.join(missing)}")
    return OK


# Decided once, at import, as the cpu backend does (a module constant is what torch.compile traces through).
_EXTENSION = _extension_verdict()


@functools.cache
def _device_verdict(index: int) -> Availability:
    capability = torch.cuda.get_device_capability(index)
    archs = compiled_archs()
    if not arch_supported(capability, archs):
        return Availability(False, f"recap_kernels._C has no code for {torch.cuda.get_device_name(index)} "
                                   f"(sm_{capability[0]}{capability[1]}); it was built for {';'.join(archs)}: "
                                   f"rebuild with TORCH_CUDA_ARCH_LIST including {capability[0]}.{capability[1]}")
    return OK


def available(device: torch.device) -> Availability:
    if device.type != "cuda":
        return Availability(False, f"the cuda backend runs on CUDA tensors, not {device.type}")
    if not _EXTENSION.ok:
        return _EXTENSION
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device is available")
    return _device_verdict(device.index if device.index is not None else torch.cuda.current_device())


def supports(kind: str, key: BucketKey, groups) -> Availability:
    return kernel_supports("the CUDA kernels", key, groups)
