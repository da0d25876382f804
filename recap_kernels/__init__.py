"""recap_kernels: fused optimizer kernels for multi-task recommendation models.

``from recap_kernels import optim`` is a drop-in for ``torch.optim`` with fused ``Adam``,
``AdamW`` and ``Adagrad``; :func:`build_optimizer` builds per-tower param groups and learning-rate
schedules from a recap training config. The builder's names (``config``, ``build_optimizer``,
``compute_lr``) load on first use, so the optimizers import without pydantic or PyYAML.
"""

from recap_kernels import optim
from recap_kernels.backends import BackendUnavailableError, available_backends

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "build_optimizer",
    "compute_lr",
    "config",
    "optim",
    "__version__",
]

_LAZY = {
    "build_optimizer": ("recap_kernels.builder", "build_optimizer"),
    "compute_lr": ("recap_kernels.schedules", "compute_lr"),
    "config": ("recap_kernels.config", None),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recap_kernels' has no attribute {name!r}")
