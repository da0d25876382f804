"""Loads the compiled extension ``recap_kernels._C`` once and remembers why it could not be loaded.

Importing ``_C`` runs its ``TORCH_LIBRARY`` static initializers, which register the
``torch.ops.recap_kernels.*`` custom ops. ``RECAP_KERNELS_SKIP_EXTENSION=1`` skips loading it
(the ``cpu`` and ``cuda`` backends then report themselves unavailable).
"""

from __future__ import annotations

import importlib
import json
import os
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def load() -> tuple[object | None, str]:
    """``(module, "")`` when ``recap_kernels._C`` is loaded, else ``(None, reason)``."""
    if os.environ.get("RECAP_KERNELS_SKIP_EXTENSION", "0") == "1":
        return None, "loading the extension is disabled (RECAP_KERNELS_SKIP_EXTENSION=1)"
    try:
        return importlib.import_module("recap_kernels._C"), ""
    except ImportError as exc:
        info = build_info()
        if not info.get("cpu_extension"):
            notes = "; ".join(info.get("notes", [])) or "no build information"
            return None, f"recap_kernels was built without its C++ extension ({notes})"
        return None, f"recap_kernels._C failed to load: {exc}"


def has_op(name: str) -> bool:
    """Whether the custom op ``torch.ops.recap_kernels.<name>`` is registered."""
    module, _ = load()
    if module is None:
        return False
    import torch

    return hasattr(torch.ops.recap_kernels, name)


@lru_cache(maxsize=None)
def build_info() -> dict:
    """What ``setup.py`` recorded about this build (``{}`` for a source tree never built)."""
    path = _HERE / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
