"""Every available backend computes what torch.optim computes (the harness lives in reference.py)."""

import pytest
import torch

from recap_kernels import available_backends
from tests.reference import FLOAT_DTYPES, OPTION_MATRIX, check_equivalence, dtype_id, fused_cuda_hyperparameters

BACKENDS = [name for name, (ok, _) in available_backends(torch.device("cpu")).items() if ok]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=lambda o: o.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch(backend, options, dtype):
    opt = check_equivalence(backend, options, dtype)
    assert opt.backends_used() == {backend}


@pytest.mark.parametrize("resume", ["from_torch", "to_torch"])
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=lambda o: o.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_across_implementations(backend, options, resume):
    check_equivalence(backend, options, torch.float32, resume=resume)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_and_adamw_weight_decay_differ(backend):
    """L2 decay folded into the gradient and decoupled decay must not collapse into one path."""
    results = []
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        from recap_kernels import optim

        ours = getattr(optim, cls.__name__)
        p = torch.linspace(-2, 2, 257, dtype=torch.float32).requires_grad_()
        opt = ours([p], lr=1e-2, weight_decay=0.1, backend=backend)
        for step in range(5):
            p.grad = torch.sin(torch.arange(257.0) + step)
            opt.step()
        results.append(p.detach().clone())
    assert not torch.allclose(results[0], results[1], rtol=0, atol=1e-6)


def test_torch_backend_is_in_the_matrix():
    assert "torch" in BACKENDS


@pytest.mark.parametrize("family", ["adam-amsgrad-wd", "adagrad-lr-decay"])
def test_harness_catches_a_small_error(monkeypatch, family):
    """The harness is only worth something if it fails: a 1e-4 relative slip in one state must be caught."""
    from recap_kernels.backends import torch_optim

    options = next(o for o in OPTION_MATRIX if o.id == family)
    real_step = torch_optim.BACKEND.step

    def slightly_wrong(kind, bucket, **amp):
        real_step(kind, bucket, **amp)
        bucket.state["sum" if kind == "adagrad" else "exp_avg_sq"][-1].mul_(1 + 1e-4)

    monkeypatch.setattr(torch_optim.BACKEND, "step", slightly_wrong)
    with pytest.raises(AssertionError):
        check_equivalence("torch", options, torch.float32)


GPU_BACKENDS = [name for name, (ok, _) in available_backends("cuda").items() if ok] if torch.cuda.is_available() else []
# Realistic sizes: a 1e7-element tensor, tails, an empty tensor, a matrix; the 300-tensor bucket
# of the recap towers is in test_triton.py / the benchmark.
GPU_SHAPES = ((10_000_019,), (1,), (3,), (4097,), (0,), (1024, 1023), (65_537,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", OPTION_MATRIX, ids=lambda o: o.id)
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_matches_torch_on_gpu(backend, options, dtype):
    if backend == "none":
        pytest.skip(f"no kernel backend can run CUDA tensors here: {available_backends('cuda')}")
    opt = check_equivalence(backend, options, dtype, device="cuda", shapes=GPU_SHAPES,
                            hyperparameters_in=fused_cuda_hyperparameters(options, dtype))
    assert opt.backends_used() == {backend}


@pytest.mark.gpu
@pytest.mark.parametrize("resume", ["from_torch", "to_torch"])
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_resume_across_implementations_on_gpu(backend, resume):
    if backend == "none":
        pytest.skip("no kernel backend can run CUDA tensors here")
    for options in OPTION_MATRIX:
        check_equivalence(backend, options, torch.float32, device="cuda", shapes=GPU_SHAPES, resume=resume,
                          hyperparameters_in=fused_cuda_hyperparameters(options, torch.float32))
