"""torch.amp.GradScaler drives our optimizers exactly as it drives torch's."""

import functools

import pytest
import torch

from recap_kernels import available_backends, optim
from tests.reference import make_params

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]

CASES = [
    ("Adam", {"fused": True}),  # in-kernel unscale through grad_scale / found_inf
    ("Adam", {}),  # the scaler unscales the gradients itself
    ("AdamW", {"fused": True, "amsgrad": True}),
    ("Adagrad", {"fused": True}),
    ("Adagrad", {}),
]


def _run(cls, kwargs, params, grads):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    opt = cls(params, lr=0.01, **kwargs)
    for grad in grads:
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grad))  # d loss / d p = g
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return opt, scaler


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "plain")
def test_grad_scaler_matches_torch_including_an_overflow_step(name, kwargs, backend):
    init = make_params([(17,), (4, 5)], torch.float32)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(6)]
    grads[3][1][2, 2] = float("inf")  # an overflow step: nothing may change, and the scale backs off

    ref_params = [p.clone().requires_grad_() for p in init]
    ref, ref_scaler = _run(getattr(torch.optim, name), kwargs, ref_params, grads)
    params = [p.clone().requires_grad_() for p in init]
    ours = functools.partial(getattr(optim, name), backend=backend)
    opt, scaler = _run(ours, kwargs, params, grads)

    assert scaler.get_scale() == ref_scaler.get_scale()
    # The torch backend runs torch's own code: bit for bit. Kernels: the harness's tolerances.
    tol = {"rtol": 0, "atol": 0} if backend == "torch" else {}
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **tol)
        for key, value in ref.state[r].items():
            torch.testing.assert_close(opt.state[p][key], value.to(opt.state[p][key].dtype), **tol)
    assert opt.state[params[0]]["step"].item() == 5  # the overflow step was skipped


def test_a_skipped_overflow_step_changes_nothing():
    p = torch.randn(9, requires_grad=True)
    opt = optim.Adam([p], fused=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p * torch.randn(9)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.zero_grad()
    scaler.scale((p * torch.full((9,), float("nan"))).sum()).backward()
    scaler.step(opt)
    torch.testing.assert_close(p.detach(), before[0], rtol=0, atol=0)
    for k, v in before[1].items():
        torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
