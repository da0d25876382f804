"""``torch.compile`` (Inductor) of a step (Note [Compiled steps] in recap_kernels/optim/_compiled.py).

A compiled step is one op in one graph whatever the number of tensors; it runs the eager step, so it
matches it bit for bit, recompiles for no change of lr or scheduler step, and ``backends_used()`` tells
what ran. A compiled training step of the builder's optimizer matches the eager one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from recap_kernels import optim
from recap_kernels.backends import get_backend

CPU = torch.device("cpu")
KERNEL_BACKENDS = [b for b in ("cpu", "triton") if get_backend(b).available(CPU).ok]
BACKENDS = ["torch", *KERNEL_BACKENDS]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sparse_grad(table: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    rows = torch.randint(0, table.shape[0], (9,), generator=gen)  # repeats on purpose
    return torch.sparse_coo_tensor(rows[None], torch.randn(9, table.shape[1], generator=gen), table.shape)


# name -> (optimizer factory, parameter shapes, whether the last parameter gets sparse gradients)
OPTIMIZERS = {
    "adam-amsgrad": (lambda ps, b: optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.1, backend=b), False),
    "adamw": (lambda ps, b: optim.AdamW(ps, lr=0.01, backend=b), False),
    "adagrad": (lambda ps, b: optim.Adagrad(ps, lr=0.05, lr_decay=0.01, backend=b), False),
    "adagrad-sparse-table": (lambda ps, b: optim.Adagrad(ps, lr=0.05, backend=b), True),
    "rowwise-adagrad": (lambda ps, b: optim.RowWiseAdagrad(ps, lr=0.05, backend=b), True),
}


def _params(name: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (11, 3)] if name == "rowwise-adagrad" else [(3,), (129,), (7, 9), (37, 5)]
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def _grads(name: str, params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    sparse = OPTIMIZERS[name][1]
    return [(_sparse_grad(p, gen) if sparse and i == len(params) - 1 else torch.randn(p.shape, generator=gen))
            for i, p in enumerate(params)]


def _run(name: str, backend: str, compiled: bool, steps: int = 4):
    params = _params(name)
    opt = OPTIMIZERS[name][0](params, backend)
    # compiled before the scheduler wraps opt.step (its wrapper lives in a file Dynamo does not trace)
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    for k in range(steps):
        for p, g in zip(params, _grads(name, params, k)):
            p.grad = g
        step()
        scheduler.step()  # a float lr changing every step: no recompile
    return params, opt


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_compiled_step_matches_the_eager_step_bit_for_bit(name, backend):
    with torch._dynamo.config.patch(error_on_recompile=True):
        got_params, got = _run(name, backend, compiled=True)
    want_params, want = _run(name, backend, compiled=False)
    for p, q in zip(got_params, want_params, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(got_params, want_params, strict=True):
        for key, value in want.state[q].items():
            assert torch.equal(got.state[p][key], value), key
    assert got.backends_used() == want.backends_used() == ({backend} if backend != "torch" else {"torch"})


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="no CPU kernels in this build")
def test_a_compiled_step_is_one_op_in_one_graph_whatever_the_tensor_count():
    counts = []
    for n in (3, 300):
        torch._dynamo.reset()
        params = [torch.randn(1 + i % 17).requires_grad_() for i in range(n)]
        groups = [{"params": params[i::3], "lr": 0.01 * (i + 1)} for i in range(3)]
        opt = optim.Adam(groups, backend="cpu")
        for p in params:
            p.grad = torch.randn_like(p)
        counter = CompileCounterWithBackend("inductor")
        step = torch.compile(opt.step, backend=counter, fullgraph=True)
        step()
        step()
        counts.append((counter.frame_count, counter.op_count))
        assert opt.backends_used() == {"cpu"}
        assert all(opt.state[p]["step"].item() == 2 for p in params)
    assert counts[0] == counts[1] == (1, 1)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="no CPU kernels in this build")
def test_inductors_code_calls_the_step_once_and_copies_nothing():
    params = [torch.randn(5 + i).requires_grad_() for i in range(50)]
    opt = optim.AdamW(params, backend="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    _, (code,) = run_and_get_code(torch.compile(opt.step, fullgraph=True))
    call = code[code.index("def call("):]
    assert call.count("torch.ops.recap_kernels.optimizer_step") == 1
    assert "copy_" not in call and "clone" not in call and "empty_strided" not in call


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="no CPU kernels in this build")
def test_no_recompile_when_lr_changes_by_hand_or_as_a_tensor():
    params = [torch.randn(8).requires_grad_() for _ in range(3)]
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": torch.tensor(0.01)}], lr=0.1,
                     backend="cpu")
    step = torch.compile(opt.step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            step()
            opt.param_groups[0]["lr"] = 0.1 / (k + 2)
            opt.param_groups[1]["lr"].fill_(0.01 / (k + 2))
    assert all(opt.state[p]["step"].item() == 4 for p in params)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="no CPU kernels in this build")
def test_a_copy_of_an_optimizer_steps_its_own_parameters_when_compiled():
    params = [torch.randn(6).requires_grad_()]
    opt = optim.Adam(params, lr=0.1, backend="cpu")
    params[0].grad = torch.randn(6)
    opt.step()
    clone = copy.deepcopy(opt)
    (clone_param,) = clone.param_groups[0]["params"]
    clone_param.grad = torch.randn(6)
    before = params[0].detach().clone()
    torch.compile(clone.step, fullgraph=True)()
    assert torch.equal(params[0], before)
    assert clone.state[clone_param]["step"].item() == 2 and opt.state[params[0]]["step"].item() == 1


def _training_step(model, opt, batch):
    ids, offsets, target = batch
    loss = ((model(ids, offsets) - target) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_training_step_of_the_builders_optimizer_matches_eager(backend):
    pytest.importorskip("pydantic")
    from recap_kernels import build_optimizer
    from tests.test_builder import ADAGRAD, HeavyRanker, _batches, _multi_task

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = HeavyRanker()  # dense table gradients: Inductor does not compile EmbeddingBag's sparse backward
        opt, scheduler = build_optimizer(model, _multi_task(), ADAGRAD, backend=backend)
        step = torch.compile(_training_step) if compiled else _training_step
        losses = []
        for batch in _batches(4, seed=3):
            losses.append(step(model, opt, batch).item())
            scheduler.step()
        results.append((model, losses, opt.backends_used()))
    (eager, eager_losses, eager_backends), (comp, comp_losses, comp_backends) = results
    assert comp_backends == eager_backends
    torch.testing.assert_close(comp_losses, eager_losses)
    for (name, p), q in zip(eager.named_parameters(), comp.parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_compiled_cuda_step_matches_eager(backend, mode):
    """On CUDA too; under reduce-overhead the step op is left out of the CUDA graphs (cudagraph_unsafe) and
    still matches."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.randn(n, device="cuda", generator=gen).requires_grad_() for n in (3, 1000, 4097)]
        opt = optim.AdamW(params, lr=torch.tensor(0.01, device="cuda"), capturable=True, backend=backend)
        step = torch.compile(opt.step, mode=mode) if compiled else opt.step
        for k in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            step()
            opt.param_groups[0]["lr"].fill_(0.01 / (k + 2))
        results.append((params, opt))
    (want, _), (got, opt) = results
    for p, q in zip(got, want, strict=True):
        assert torch.equal(p, q)
    assert opt.backends_used() == {backend}
