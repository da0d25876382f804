"""The cached step plan follows every change that decides it (see FusedStepMixin._plan)."""

import pytest
import torch

from recap_kernels import available_backends, optim
from tests.reference import assert_optimizer_close, make_params

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]


def _pair(shapes):
    init = make_params(shapes, torch.float32)
    return [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]


def _step(opts_and_params, grads):
    for opt, params in opts_and_params:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_follows_gradient_layout_and_presence(backend):
    ref_params, params = _pair([(6, 4), (9,), (5,)])
    ref = torch.optim.Adam(ref_params, weight_decay=0.1)
    opt = optim.Adam(params, weight_decay=0.1, backend="auto")
    pairs = [(ref, ref_params), (opt, params)]
    gen = torch.Generator().manual_seed(3)

    def grads():
        return [torch.randn(p.shape, generator=gen) for p in params]

    _step(pairs, grads())
    plan = opt._plan_cache
    _step(pairs, grads())
    assert opt._plan_cache is plan  # nothing changed: the plan was reused
    g = grads()
    g[0] = torch.randn(4, 6, generator=gen).t()  # a non-contiguous gradient: a new bucket
    _step(pairs, g)
    assert opt._plan_cache is not plan and "torch" in opt.backends_used()
    g = grads()
    g[1] = None  # a parameter without a gradient this step
    _step(pairs, g)
    _step(pairs, grads())
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_plan_follows_group_options_and_the_environment(monkeypatch):
    params = [torch.randn(5, requires_grad=True)]
    params[0].grad = torch.randn(5)
    opt = optim.Adam(params)
    opt.step()
    plan = opt._plan_cache
    opt.param_groups[0]["foreach"] = True  # an option that decides how torch's path runs
    opt.step()
    assert opt._plan_cache is not plan
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "torch")
    opt.step()
    assert opt.backends_used() == {"torch"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_that_differ_in_amsgrad_share_a_bucket(backend):
    """States that only some groups have (max_exp_avg_sq) stay aligned with their parameters."""
    ref_params, params = _pair([(7,), (300,), (4,), (33,), (5,)])
    split = [{"params": ref_params[:2]}, {"params": ref_params[2:4], "amsgrad": True}, {"params": ref_params[4:]}]
    ref = torch.optim.Adam(split, weight_decay=0.01)
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:4], "amsgrad": True}, {"params": params[4:]}],
                     weight_decay=0.01, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        _step([(ref, ref_params), (opt, params)], [torch.randn(p.shape, generator=gen) for p in params])
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


class _Stream:
    def __init__(self, capturing: bool):
        self.capturing = capturing

    def is_capturing(self) -> bool:
        return self.capturing


@pytest.mark.parametrize("capturing", [False, True])
def test_graph_capture_check_as_torch_where_an_accelerator_is_present(monkeypatch, capturing):
    """torch's Adam checks a CUDA-graph capture against ``capturable``; Adagrad has no such option
    and is not checked (its groups have no ``capturable`` key). Simulates a machine with a GPU."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: _Stream(capturing))
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.randn(5)
    optim.Adagrad([p], backend="torch").step()  # never a KeyError on 'capturable'
    adam = optim.Adam([p], backend="torch")
    if capturing:
        with pytest.raises(RuntimeError, match="capturable is False"):
            adam.step()
    else:
        adam.step()
