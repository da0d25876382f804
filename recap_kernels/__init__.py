"""recap_kernels: fused optimizer kernels for multi-task recommendation models.

``from recap_kernels import optim`` is a drop-in for ``torch.optim`` with fused ``Adam``,
``AdamW`` and ``Adagrad``; :func:`build_optimizer` builds per-tower param groups and learning-rate
schedules from a recap training config. The builder's names (``config``, ``build_optimizer``,
``compute_lr``) load on first use, so the optimizers import without pydantic or PyYAML.
"""

from recap_kernels import optim
from recap_kernels.backends import BackendUnavailableError, available_backends


def _version() -> str:
    # One place for the version: pyproject.toml, through the installed metadata (or, for a source tree
    # built in place, what setup.py recorded from it).
    import importlib.metadata

    try:
        return importlib.metadata.version("recap-kernels")
    except importlib.metadata.PackageNotFoundError:
        from recap_kernels import _ext

        return _ext.build_info().get("version", "0+unknown")


__version__ = _version()

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
