"""The drop-in namespace and the backend registry."""

import logging

import pytest
import torch

import recap_kernels
from recap_kernels import backends, optim
from recap_kernels.backends import BACKEND_NAMES, BucketKey, get_backend, resolve

OURS = {"Adam", "AdamW", "Adagrad"}


def test_every_public_name_of_torch_optim_is_there():
    public = {name for name in dir(torch.optim) if not name.startswith("_")}
    missing = public - set(dir(optim))
    assert not missing
    assert optim.__all__ == [*torch.optim.__all__, "RowWiseAdagrad"]  # plus the one optimizer torch.optim lacks
    for name in public - OURS:
        assert getattr(optim, name) is getattr(torch.optim, name), name
    assert optim.lr_scheduler is torch.optim.lr_scheduler


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_classes_subclass_torchs(name):
    ours, theirs = getattr(optim, name), getattr(torch.optim, name)
    assert ours is not theirs and issubclass(ours, theirs)
    p = torch.zeros(3, requires_grad=True)
    assert isinstance(ours([p]), theirs)


def test_available_backends_reports_every_backend_with_a_reason():
    report = recap_kernels.available_backends()
    assert tuple(report) == BACKEND_NAMES == ("torch", "triton", "cuda", "cpu")
    assert report["torch"] == (True, "")
    for name, (ok, reason) in report.items():
        assert isinstance(ok, bool)
        assert ok or reason, f"{name} is unavailable without a reason"
    if not torch.cuda.is_available():
        assert report["cuda"] == (False, "no CUDA device is available")


def test_available_backends_for_a_device():
    report = recap_kernels.available_backends("cpu")
    assert report["cuda"][0] is False and "CUDA tensors" in report["cuda"][1]


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(recap_kernels.BackendUnavailableError, RuntimeError)


def test_auto_prefers_the_fastest_usable_backend_and_logs_it(caplog):
    key = BucketKey(torch.device("cpu"), torch.float32, "contiguous")
    group = torch.optim.Adam([torch.zeros(1, requires_grad=True)]).param_groups[0]
    cpu_ok = recap_kernels.available_backends("cpu")["cpu"][0]
    backends._log_choice.cache_clear()  # each decision is logged once per process
    with caplog.at_level(logging.DEBUG, logger="recap_kernels"):
        chosen = resolve("auto", key, "adam", [group])
    assert chosen.name == ("cpu" if cpu_ok else "torch")
    assert any("runs on backend" in r.getMessage() for r in caplog.records)


def test_get_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("numpy")
    assert get_backend("torch").name == "torch"


def test_backends_used_reports_what_ran():
    p = torch.randn(4, requires_grad=True)
    opt = optim.Adam([p], backend="torch")
    assert opt.backends_used() == set()
    opt.step()  # no gradient yet: nothing dispatched
    assert opt.backends_used() == set()
    p.grad = torch.randn(4)
    opt.step()
    assert opt.backends_used() == {"torch"}
    assert opt.backend == "torch"


def test_steps_live_on_the_parameter_device_as_float32():
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4)
    for opt in (optim.Adam([p]), optim.Adagrad([p])):
        opt.step()
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and step.dim() == 0
        assert step.item() == 1.0


def test_optional_builder_dependencies_load_lazily():
    import subprocess
    import sys

    code = "import sys, recap_kernels; assert 'pydantic' not in sys.modules and 'yaml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
