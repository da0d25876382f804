"""The backend registry: which module runs a bucket of tensors, and why the others cannot.

``resolve(requested, key, kind, groups)`` is the single decision point:

* an explicit name (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"``) runs that backend or raises
  :class:`BackendUnavailableError` saying why and what would run here: never a silent fallback;
* ``"auto"`` is replaced by ``$RECAP_KERNELS_BACKEND`` when that is set, and otherwise takes the
  first backend of the device's preference order that can run the bucket (CUDA tensors:
  cuda > triton > torch; CPU tensors: cpu > torch), logging the choice at DEBUG.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

from recap_kernels.backends import native, torch_optim, triton_kernels
from recap_kernels.backends._base import Availability, Backend, BackendUnavailableError, Bucket, BucketKey

__all__ = [
    "Availability",
    "Backend",
    "BackendUnavailableError",
    "Bucket",
    "BucketKey",
    "BACKEND_NAMES",
    "check_backend_name",
    "ENV_VAR",
    "available_backends",
    "get_backend",
    "resolve",
]

log = logging.getLogger("recap_kernels")

ENV_VAR = "RECAP_KERNELS_BACKEND"
_REGISTRY: dict[str, Backend] = {
    b.name: b for b in (torch_optim.BACKEND, triton_kernels.BACKEND, native.CUDA, native.CPU)
}
BACKEND_NAMES = tuple(_REGISTRY)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def check_backend_name(name: str) -> str:
    """Validate a ``backend=`` argument; returns it unchanged."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKEND_NAMES)}")
    return name


def get_backend(name: str) -> Backend:
    check_backend_name(name)
    if name == "auto":
        raise ValueError("get_backend() takes a backend name, not 'auto'")
    return _REGISTRY[name]


def _home_device(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """``{name: (ok, reason)}`` for every registered backend.

    With ``device`` given, whether each backend can run tensors on that device; without it, each
    backend is asked about the device it is meant for (CUDA for ``cuda``, and for ``triton`` when a
    GPU is present; CPU otherwise).
    """
    result = {}
    for name, backend in _REGISTRY.items():
        dev = torch.device(device) if device is not None else _home_device(name)
        result[name] = tuple(backend.available(dev))
    return result


def _verdict(backend: Backend, key: BucketKey, kind: str, groups) -> Availability:
    verdict = backend.available(key.device)
    if verdict.ok:
        verdict = backend.supports(kind, key, groups)
    return verdict


def resolve(requested: str, key: BucketKey, kind: str, groups) -> Backend:
    """The backend that runs ``kind`` ("adam" | "adagrad") on this bucket; raises if an explicit one can't."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested != "auto" and requested not in _REGISTRY:
            raise ValueError(f"{ENV_VAR}={requested!r} is not 'auto' or one of {', '.join(BACKEND_NAMES)}")
    if requested != "auto":
        backend = _REGISTRY[requested]
        verdict = _verdict(backend, key, kind, groups)
        if not verdict.ok:
            usable = [n for n in _AUTO_ORDER.get(key.device.type, ("torch",))
                      if _verdict(_REGISTRY[n], key, kind, groups).ok]
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run {kind} on {key}: {verdict.reason}. "
                f"Usable here: {', '.join(usable) or 'none'} (or backend='auto')"
            )
        return backend
    reasons = []
    for name in _AUTO_ORDER.get(key.device.type, ("torch",)):
        verdict = _verdict(_REGISTRY[name], key, kind, groups)
        if verdict.ok:
            _log_choice(name, kind, key, tuple(reasons))
            return _REGISTRY[name]
        reasons.append(f"{name}: {verdict.reason}")
    raise BackendUnavailableError(f"no backend can run {kind} on {key}: {'; '.join(reasons)}")


@lru_cache(maxsize=256)
def _log_choice(name: str, kind: str, key: BucketKey, skipped: tuple[str, ...]) -> None:
    # Cached so a training loop logs each decision once, not every step.
    log.debug("recap_kernels: %s on %s runs on backend %r (skipped: %s)", kind, key, name,
              "; ".join(skipped) or "none")
