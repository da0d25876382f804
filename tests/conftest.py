"""Test set-up shared by every test module.

Without a GPU, Triton kernels can only run through its interpreter, which must be switched on
before ``triton`` is first imported: hence the environment variable here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_isolate_backend(monkeypatch):
    """Every test starts from the same seed and without a backend forced through the environment."""
    torch.manual_seed(0)
    monkeypatch.delenv("RECAP_KERNELS_BACKEND", raising=False)
