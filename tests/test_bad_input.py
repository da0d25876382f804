"""Bad input gets torch's own error, an unavailable backend says why, and a failed step changes nothing."""

import copy
import re

import pytest
import torch

from recap_kernels import BackendUnavailableError, optim


def _param(n=7):
    p = torch.randn(n, requires_grad=True)
    p.grad = torch.randn(n)
    return p


INVALID = [
    ("Adam", {"lr": -1.0}),
    ("Adam", {"eps": -1e-8}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, 1.0)}),
    ("Adam", {"betas": (-0.1, 0.999)}),
    ("Adam", {"weight_decay": -0.1}),
    ("Adam", {"betas": (torch.tensor(0.9), 0.999)}),
    ("Adam", {"lr": torch.tensor([1e-3, 1e-3])}),
    ("Adam", {"lr": torch.tensor(1e-3), "foreach": True}),
    ("Adam", {"fused": True, "differentiable": True}),
    ("Adam", {"fused": True, "foreach": True}),
    ("AdamW", {"lr": -1.0}),
    ("AdamW", {"weight_decay": -1.0}),
    ("AdamW", {"betas": (0.9, 1.5)}),
    ("AdamW", {"fused": True, "foreach": True}),
    ("Adagrad", {"lr": -1.0}),
    ("Adagrad", {"lr_decay": -0.1}),
    ("Adagrad", {"weight_decay": -0.1}),
    ("Adagrad", {"initial_accumulator_value": -0.1}),
    ("Adagrad", {"eps": -1e-10}),
    ("Adagrad", {"lr": torch.tensor([0.1, 0.1])}),
    ("Adagrad", {"fused": True, "differentiable": True}),
    ("Adagrad", {"fused": True, "foreach": True}),
]


@pytest.mark.parametrize("name,kwargs", INVALID, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_invalid_hyperparameters_raise_torchs_error(name, kwargs):
    with pytest.raises(Exception) as expected:
        getattr(torch.optim, name)([_param()], **kwargs)
    with pytest.raises(type(expected.value)) as got:
        getattr(optim, name)([_param()], **kwargs)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad"])
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*torch, triton, cuda, cpu"):
        getattr(optim, name)([_param()], backend="fastest")


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, params, before):
    old_params, old_state = before
    for p, old in zip(params, old_params):
        torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
    new_state = opt.state_dict()
    assert new_state["state"].keys() == old_state["state"].keys()
    for pid, entries in old_state["state"].items():
        for key, value in entries.items():
            torch.testing.assert_close(new_state["state"][pid][key], value, rtol=0, atol=0)


def _two_groups_one_step_done(cls, backend="auto", **kwargs):
    """An optimizer with two groups and state from one earlier step, which must survive a failed step.

    The first step runs on the torch backend; the returned optimizer, built with ``backend``,
    resumes from its ``state_dict``.
    """
    params = [_param(5), _param(9), _param(4)]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}]
    first = cls(groups, backend="torch", **kwargs)
    first.step()
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], backend=backend, **kwargs)
    opt.load_state_dict(first.state_dict())
    for p in params:
        p.grad = torch.randn_like(p)
    return opt, params


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "cpu"])
def test_unavailable_backend_raises_with_reason_and_changes_nothing(name, backend):
    from recap_kernels import available_backends

    ok, reason = available_backends("cpu")[backend]
    if ok:
        pytest.skip(f"{backend} is available here")
    opt, params = _two_groups_one_step_done(getattr(optim, name), backend=backend)
    before = _snapshot(opt, params)
    with pytest.raises(BackendUnavailableError) as err:
        opt.step()
    message = str(err.value)
    assert f"backend {backend!r} cannot run" in message and reason in message
    assert re.search(r"Usable here: (\w+, )*torch", message)
    assert isinstance(err.value, RuntimeError)
    _assert_unchanged(opt, params, before)


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "cuda")  # never runs CPU tensors
    opt = optim.Adam([_param()])
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run"):
        opt.step()
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "torch")
    opt.step()
    assert opt.backends_used() == {"torch"}
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RECAP_KERNELS_BACKEND='bogus'"):
        opt.step()


def test_environment_variable_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "cuda")
    opt = optim.Adam([_param()], backend="torch")
    opt.step()
    assert opt.backends_used() == {"torch"}


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_gradient_to_adam_raises_before_any_update(name):
    opt, params = _two_groups_one_step_done(getattr(optim, name))
    # Only the *second* group's gradient is sparse: torch.optim would already have updated the
    # first group when it raised; we must not.
    params[2].grad = params[2].grad.to_sparse()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    _assert_unchanged(opt, params, before)


def test_sparse_gradient_with_weight_decay_to_adagrad_raises_before_any_update():
    opt, params = _two_groups_one_step_done(optim.Adagrad, weight_decay=0.1)
    params[2].grad = params[2].grad.to_sparse()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    _assert_unchanged(opt, params, before)


def test_capturable_on_cpu_raises_torchs_error_before_any_update():
    params = [_param(5), _param(3)]
    opt = optim.Adam(params, capturable=True)
    before = _snapshot(opt, params)
    with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on supported"):
        opt.step()
    _assert_unchanged(opt, params, before)
    assert opt.state_dict()["state"] == {}  # no state was created either


def test_first_step_failure_creates_no_state():
    params = [_param(5), _param(3)]
    params[1].grad = params[1].grad.to_sparse()
    opt = optim.Adam(params)
    with pytest.raises(RuntimeError):
        opt.step()
    assert len(opt.state) == 0
