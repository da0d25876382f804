"""state_dict interop with torch.optim, both ways, mid-training (resumes are also in the harness)."""

import copy
import functools
import io
import pickle

import pytest
import torch

from recap_kernels import available_backends, optim
from tests.reference import make_grads, make_params, tolerances, train

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]

PAIRS = {
    "adam": (torch.optim.Adam, optim.Adam, {"amsgrad": True, "weight_decay": 0.01}),
    "adamw": (torch.optim.AdamW, optim.AdamW, {"weight_decay": 0.1}),
    "adagrad": (torch.optim.Adagrad, optim.Adagrad, {"lr_decay": 0.01, "initial_accumulator_value": 0.2}),
}
SHAPES = ((5,), (3, 7), (1,), (129,))


def _fresh(shapes=SHAPES):
    return [p.requires_grad_() for p in make_params(shapes, torch.float32)]


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_state_dict_has_torchs_layout(family):
    theirs, ours, kwargs = PAIRS[family]
    grads = make_grads(_fresh(), 3)
    dicts = []
    for cls in (theirs, ours):
        params = _fresh()
        opt = cls(params, **kwargs)
        train(opt, params, grads)
        dicts.append(opt.state_dict())
    ref, got = dicts
    assert got["param_groups"] == ref["param_groups"]  # no extra keys that would leak into torch
    assert got["state"].keys() == ref["state"].keys()
    for pid in ref["state"]:
        assert got["state"][pid].keys() == ref["state"][pid].keys()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
@pytest.mark.parametrize("family", sorted(PAIRS))
def test_checkpoint_file_roundtrip_continues_with_the_same_numbers(tmp_path, family, direction, backend):
    theirs, ours, kwargs = PAIRS[family]
    ours = functools.partial(ours, backend=backend)
    first_cls, second_cls = (ours, theirs) if direction == "ours_to_torch" else (theirs, ours)
    grads = make_grads(_fresh(), 10)

    ref_params = _fresh()
    ref = theirs(ref_params, **kwargs)
    train(ref, ref_params, grads)

    params = _fresh()
    first = first_cls(params, **kwargs)
    train(first, params, grads[:5])
    torch.save({"optimizer": first.state_dict()}, tmp_path / "ckpt.pt")
    second = second_cls(params, **kwargs)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"])
    train(second, params, grads[5:])

    # The torch backend is torch's own code, bit for bit; kernels within the harness's tolerance.
    tol = {"rtol": 0, "atol": 0} if backend == "torch" else tolerances(torch.float32)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **tol)
    for p, r in zip(params, ref_params):
        for key, value in ref.state[r].items():
            got = second.state[p][key].cpu()
            torch.testing.assert_close(got, value.cpu().to(got.dtype), **tol)


def test_loaded_steps_move_to_the_parameter_device_as_float32():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch then keeps non-fused steps as float64 on the host
    try:
        params = _fresh()
        first = torch.optim.Adam(params)
        train(first, params, make_grads(params, 2))
        assert first.state[params[0]]["step"].dtype == torch.float64
        ours = optim.Adam(params)
        ours.load_state_dict(first.state_dict())
    finally:
        torch.set_default_dtype(prev)
    for p in params[:-1]:  # make_grads never gives the last parameter a gradient
        step = ours.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and step.item() == 2.0


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_pickle_and_deepcopy_keep_training(family):
    _, ours, kwargs = PAIRS[family]
    params = _fresh()
    opt = ours(params, backend="torch", **kwargs)
    train(opt, params, make_grads(params, 2))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        clone_params = clone.param_groups[0]["params"]
        for p in clone_params:
            p.grad = torch.ones_like(p)
        clone.step()
        assert clone.backends_used() == {"torch"}
        assert clone.state[clone_params[0]]["step"].item() == 3.0


def test_torch_save_of_the_whole_optimizer():
    params = _fresh()
    opt = optim.Adagrad(params)
    train(opt, params, make_grads(params, 1))
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, optim.Adagrad) and loaded.backend == "auto"
