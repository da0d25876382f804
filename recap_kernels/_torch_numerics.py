"""Which operation order torch's own fused CUDA Adam uses, read from the torch installed here.

torch's fused CUDA Adam changed its arithmetic (pytorch/pytorch#173224, torch 2.11): before, the
hyperparameters stayed in double and every step mixing them with float values ran in double; since,
they are rounded to the math dtype and the moments are fused multiply-adds. Our CUDA kernels match
torch's to the last bit only in the same order (Note [CUDA operation order] in
``csrc/include/recap_kernels/adam_math.h``), so the build asks which one the torch it compiles
against has. This module imports nothing but the standard library and torch (setup.py loads it by
path).
"""

from __future__ import annotations

import os


def _fused_adam_header() -> str | None:
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "native", "cuda", "fused_adam_utils.cuh")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def torch_cuda_adam_opmath() -> bool:
    """True when torch's fused CUDA Adam computes in the math dtype with FMA moments (torch >= 2.11).

    Read from the installed header when torch ships it (the kernel's source is the authority), else
    from the version number.
    """
    header = _fused_adam_header()
    if header is not None:
        return "std::fma(beta1," in header.replace(" ", "")
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 11)
