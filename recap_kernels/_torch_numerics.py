"""Which operation orders torch's own fused CUDA optimizers use, read from the torch installed here.

torch's fused CUDA Adam changed its arithmetic (pytorch/pytorch#173224, torch 2.11): before, the
hyperparameters stayed in double and every step mixing them with float values ran in double; since,
they are rounded to the math dtype and the moments are fused multiply-adds. Our CUDA kernels match
torch's to the last bit only in the same order (Note [CUDA operation order] in
``csrc/include/recap_kernels/adam_math.h``), so the build asks which one the torch it compiles
against has.

torch 2.12 added a fused CUDA Adagrad (``fused=True`` on CUDA, fused_adagrad_utils.cuh); before, its
only fused Adagrad was the CPU kernel. Our CUDA Adagrad follows torch's CUDA kernel where torch has
one, the CPU kernel's order otherwise (Note [CUDA Adagrad order] in
``csrc/include/recap_kernels/adagrad_math.h``).

This module imports nothing but the standard library and torch (setup.py loads it by path).
"""

from __future__ import annotations

import os


def _torch_cuda_header(name: str) -> str | None:
    """The text of torch's installed ``ATen/native/cuda/<name>``, or None where torch ships no such header."""
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "native", "cuda", name)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _fused_adam_header() -> str | None:
    return _torch_cuda_header("fused_adam_utils.cuh")


def fused_adagrad_header() -> str | None:
    """torch's fused CUDA Adagrad kernel (``adagrad_math``), where the installed torch ships its headers."""
    return _torch_cuda_header("fused_adagrad_utils.cuh")


def _torch_version() -> tuple[int, int]:
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return major, minor


def torch_cuda_adam_opmath() -> bool:
    """True when torch's fused CUDA Adam computes in the math dtype with FMA moments (torch >= 2.11).

    Read from the installed header when torch ships it (the kernel's source is the authority), else
    from the version number.
    """
    header = _fused_adam_header()
    if header is not None:
        return "std::fma(beta1," in header.replace(" ", "")
    return _torch_version() >= (2, 11)


def torch_cuda_fused_adagrad() -> bool:
    """True when torch has a fused CUDA Adagrad (torch >= 2.12), whose operation order our CUDA kernels follow.

    Read from the installed header when torch ships its headers (the kernel's source is the
    authority), else from the version number.
    """
    header = fused_adagrad_header()
    if header is not None:
        return "FusedAdagradMathFunctor" in header
    return _torch_version() >= (2, 12)
