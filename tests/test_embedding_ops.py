"""The table ops themselves (Note [Table ops] in csrc/ops.cpp): ``fused_sparse_adagrad_`` and
``fused_rowwise_adagrad_`` called directly on CPU tables.

Exact sparse Adagrad is compared with torch.optim.Adagrad's sparse step (run in float64 on copies of
the tables, and in float32 as it is); row-wise Adagrad with the float64 reference
``tests.reference.rowwise_adagrad_reference``. Fresh random tables, states and gradients; odd sizes,
uncoalesced gradients (rows repeated, unsorted), several groups in one call, every check raising
before any write. The optimizer-level tests are in test_embedding_tables.py.
"""

from __future__ import annotations

import pytest
import torch

from recap_kernels import _ext
from tests.reference import (
    FLOAT_DTYPES,
    adagrad_hyper,
    dtype_id,
    rowwise_adagrad_reference,
    sparse_rows_grad,
    tolerances,
)

HAS_OPS = _ext.has_op("fused_sparse_adagrad_") and _ext.has_op("fused_rowwise_adagrad_")
pytestmark = pytest.mark.skipif(not HAS_OPS, reason=f"recap_kernels._C lacks the table ops ({_ext.load()[1]})")

if HAS_OPS:
    from recap_kernels import _ops

# (rows, dim): one element, smaller than any vector, a few vectors wide, one past a power of two.
TABLES = [(1, 1), (7, 3), (300, 64), (40, 129)]
# Two groups: the first table alone with plain hyperparameters, the others with lr_decay and their own eps.
GROUPS = [1, 3]
SPARSE_HYPER = {"lr": [0.1, 0.05], "lr_decay": [0.0, 0.1], "eps": [1e-10, 1e-6]}
ROWWISE_HYPER = {**SPARSE_HYPER, "weight_decay": [0.0, 0.01]}


def _indices(rows: int, n: int, gen: torch.Generator) -> list[int]:
    """``n`` unsorted indices with repeats over the first two thirds of a table, row 0 twice: the rest of
    the table is never named."""
    span = max(1, 2 * rows // 3)
    return [0, *torch.randint(0, span, (n,), generator=gen).tolist(), 0]


def _untouched(rows: int) -> slice:
    return slice(max(1, 2 * rows // 3), None)


def _state(dtype, *, rowwise, sparse=True, tables=TABLES, seed=0):
    """``[params, grads, state_sums, state_steps]``: random tables, positive sums, steps already taken."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, sums, steps = [], [], [], []
    for t, (rows, dim) in enumerate(tables):
        params.append(torch.randn(rows, dim, generator=gen).to(dtype))
        if sparse:
            grads.append(sparse_rows_grad(rows, dim, _indices(rows, 2 * rows + 3, gen), dtype=dtype, seed=seed + t))
        else:
            grads.append(torch.randn(rows, dim, generator=gen).to(dtype))
        sums.append((torch.rand(rows, 1 if rowwise else dim, generator=gen) + 0.1).to(dtype))
        steps.append(torch.tensor(float(t + 2)))
    return [params, grads, sums, steps]


def _clone(state):
    return [[t.clone() for t in ts] for ts in state]


def _hyper(h, weight_decay=True):
    return adagrad_hyper(h["lr"], h["lr_decay"], h["eps"], h.get("weight_decay", [0.0] * len(h["lr"])))


def _sparse_call(state, hyper=SPARSE_HYPER, groups=GROUPS, lr_tensors=None, **kwargs):
    _ops.fused_sparse_adagrad_(*state, groups, _hyper(hyper), lr_tensors or [None] * len(groups),
                               **{"maximize": False, **kwargs})


def _rowwise_call(state, hyper=ROWWISE_HYPER, groups=GROUPS, lr_tensors=None, **kwargs):
    _ops.fused_rowwise_adagrad_(*state, groups, _hyper(hyper), lr_tensors or [None] * len(groups),
                                **{"maximize": False, **kwargs})


def _group_of(i, groups=GROUPS):
    bounds = torch.tensor(groups).cumsum(0)
    return int((bounds <= i).sum())


def _torch_sparse_adagrad(state, *, maximize=False, math=torch.float64, hyper=SPARSE_HYPER):
    """torch.optim.Adagrad's sparse step on copies of the tables in ``math`` (the reference), results
    rounded to the tables' dtypes: ``[params, sums, steps]``."""
    params, grads, sums, steps = state
    out = [[], [], []]
    for i, (p, g, s, step) in enumerate(zip(params, grads, sums, steps)):
        k = _group_of(i)
        ref = p.to(math).requires_grad_()
        opt = torch.optim.Adagrad([ref], lr=hyper["lr"][k], lr_decay=hyper["lr_decay"][k], eps=hyper["eps"][k],
                                  maximize=maximize)
        opt.state[ref]["sum"] = s.to(math)
        opt.state[ref]["step"] = step.clone()
        ref.grad = torch.sparse_coo_tensor(g._indices(), g._values().to(math), g.shape, check_invariants=False)
        opt.step()
        out[0].append(ref.detach().to(p.dtype))
        out[1].append(opt.state[ref]["sum"].to(s.dtype))
        out[2].append(opt.state[ref]["step"])
    return out


def _rowwise_reference(state, *, maximize=False, hyper=ROWWISE_HYPER):
    params, grads, sums, steps = _clone(state)
    for i, (p, g, s, step) in enumerate(zip(params, grads, sums, steps)):
        k = _group_of(i)
        rowwise_adagrad_reference(p, s, step, g, lr=hyper["lr"][k], lr_decay=hyper["lr_decay"][k],
                                  weight_decay=hyper["weight_decay"][k], eps=hyper["eps"][k], maximize=maximize)
    return [params, sums, steps]


def _assert_close(got, expected, dtype, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **tolerances(dtype), msg=lambda m: f"{what}[{i}]: {m}")


def _assert_untouched(after, before):
    """Rows that no gradient named are bit for bit what they were, and so are their sums."""
    for i, (rows, _) in enumerate(TABLES):
        for k in (0, 2):  # params, sums
            assert torch.equal(after[k][i][_untouched(rows)], before[k][i][_untouched(rows)]), (k, i)


# -- sparse Adagrad ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_sparse_adagrad_is_torchs_in_float64(dtype, maximize):
    before = _state(dtype, rowwise=False)
    ours = _clone(before)
    for step in range(3):
        expected = _torch_sparse_adagrad(ours, maximize=maximize)
        _sparse_call(ours, maximize=maximize)
        _assert_close(ours[0], expected[0], dtype, f"step {step} params")
        _assert_close(ours[2], expected[1], dtype, f"step {step} sums")
        assert [float(s) for s in ours[3]] == [float(s) for s in expected[2]]
        ours[1] = _state(dtype, rowwise=False, seed=step + 1)[1]  # a new gradient per step
    _assert_untouched(ours, before)


def test_sparse_adagrad_float32_is_torchs_float32_step():
    state = _state(torch.float32, rowwise=False, seed=7)
    expected = _torch_sparse_adagrad(state, math=torch.float32)
    _sparse_call(state)
    _assert_close(state[0], expected[0], torch.float32, "params")
    _assert_close(state[2], expected[1], torch.float32, "sums")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_sparse_adagrad_large_table_many_duplicates(dtype):
    """A table whose row count needs two radix passes of different widths, more entries than rows, the
    work split between threads."""
    rows, dim = 70_001, 8
    gen = torch.Generator().manual_seed(3)
    indices = (torch.rand(50_000, generator=gen) ** 3 * rows).long().tolist()
    state = [[torch.randn(rows, dim, generator=gen).to(dtype)], [sparse_rows_grad(rows, dim, indices, dtype=dtype)],
             [(torch.rand(rows, dim, generator=gen) + 0.1).to(dtype)], [torch.tensor(0.0)]]
    # Row 0 has thousands of entries: float32 sums of them differ from float64 ones, so float32 tables
    # are compared with torch's float32 step (which sums them in float32 too).
    math = torch.float32 if dtype == torch.float32 else torch.float64
    expected = _torch_sparse_adagrad(state, math=math, hyper={k: v[:1] for k, v in SPARSE_HYPER.items()})
    _ops.fused_sparse_adagrad_(*state, [1], _hyper({k: v[:1] for k, v in SPARSE_HYPER.items()}), [None],
                               maximize=False)
    _assert_close(state[0], expected[0], dtype, "params")
    _assert_close(state[2], expected[1], dtype, "sums")


def test_results_do_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            for rowwise, call in ((False, _sparse_call), (True, _rowwise_call)):
                state = _state(torch.float32, rowwise=rowwise, tables=[(3000, 33)], seed=11)
                call(state, groups=[1], hyper={k: v[:1] for k, v in (ROWWISE_HYPER if rowwise else SPARSE_HYPER).items()})
                results.append(state)
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(results[:2], results[2:]):
        _assert_unchanged(a, _snapshot(b))


# -- row-wise Adagrad -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_rowwise_adagrad_is_the_reference(dtype, maximize, sparse):
    before = _state(dtype, rowwise=True, sparse=sparse)
    ours = _clone(before)
    for step in range(3):
        expected = _rowwise_reference(ours, maximize=maximize)
        _rowwise_call(ours, maximize=maximize)
        _assert_close(ours[0], expected[0], dtype, f"step {step} params")
        _assert_close(ours[2], expected[1], dtype, f"step {step} sums")
        assert [float(s) for s in ours[3]] == [float(s) for s in expected[2]]
        ours[1] = _state(dtype, rowwise=True, sparse=sparse, seed=step + 1)[1]
    if sparse:
        _assert_untouched(ours, before)


# -- Tensor lr, AMP, empty gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
def test_a_tensor_lr_is_read_at_each_call(rowwise, lr_dtype):
    call = _rowwise_call if rowwise else _sparse_call
    hyper = ROWWISE_HYPER if rowwise else SPARSE_HYPER
    lr = torch.tensor(hyper["lr"][1], dtype=lr_dtype)
    with_tensor = _state(torch.float32, rowwise=rowwise)
    with_float = _clone(with_tensor)
    call(with_tensor, lr_tensors=[None, lr], hyper={**hyper, "lr": [hyper["lr"][0], 123.0]})  # the tensor wins
    call(with_float, hyper={**hyper, "lr": [hyper["lr"][0], float(lr)]})
    _assert_unchanged(with_tensor, _snapshot(with_float))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_amp_unscales_the_gradients_in_place_and_found_inf_skips_everything(dtype, rowwise, sparse):
    if not rowwise and not sparse:
        pytest.skip("sparse Adagrad takes sparse gradients only")
    call = _rowwise_call if rowwise else _sparse_call
    unscaled = _state(dtype, rowwise=rowwise, sparse=sparse)
    scale = torch.tensor(512.0)

    def scaled_grads():
        grads = []
        for g in unscaled[1]:
            if g.is_sparse:
                grads.append(torch.sparse_coo_tensor(g._indices(), g._values() * 512, g.shape, check_invariants=False))
            else:
                grads.append(g * 512)
        return grads

    plain = _clone(unscaled)
    call(plain)
    amp = _clone(unscaled)
    amp[1] = scaled_grads()
    call(amp, grad_scale=scale, found_inf=torch.tensor(0.0))
    _assert_unchanged(amp, _snapshot(plain))  # gradients unscaled in place, tables the same
    for g in amp[1]:
        assert g.is_sparse == sparse

    skipped = _clone(unscaled)
    skipped[1] = scaled_grads()
    before = _snapshot(skipped)
    call(skipped, grad_scale=scale, found_inf=torch.tensor(1.0))
    _assert_unchanged(skipped, before)


def test_amp_unscales_non_contiguous_values_in_place():
    rows, dim = 9, 5
    values = torch.randn(dim, 6).t()  # (6, dim), not contiguous
    grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3, 8, 0, 1]]), values, (rows, dim), check_invariants=False)
    assert not grad._values().is_contiguous()
    expected = grad._values() / 4
    state = [[torch.randn(rows, dim)], [grad], [torch.rand(rows, dim) + 0.1], [torch.tensor(0.0)]]
    reference = [[state[0][0].clone()], [torch.sparse_coo_tensor(grad._indices(), expected.clone(), grad.shape)],
                 [state[2][0].clone()], [torch.tensor(0.0)]]
    hyper = {k: v[:1] for k, v in SPARSE_HYPER.items()}
    _sparse_call(state, hyper=hyper, groups=[1], grad_scale=torch.tensor(4.0))
    _sparse_call(reference, hyper=hyper, groups=[1])
    assert torch.equal(grad._values(), expected)
    assert torch.equal(state[0][0], reference[0][0]) and torch.equal(state[2][0], reference[2][0])


@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
def test_an_empty_gradient_only_advances_step(rowwise):
    call = _rowwise_call if rowwise else _sparse_call
    state = _state(torch.float32, rowwise=rowwise)
    state[1] = [torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, dim), (rows, dim))
                for rows, dim in TABLES]
    before = _clone(state)
    call(state)
    for k in (0, 2):
        assert all(torch.equal(x, y) for x, y in zip(state[k], before[k]))
    assert [float(s) for s in state[3]] == [float(s) + 1 for s in before[3]]


# -- checks before any write ------------------------------------------------------------------------------------------
def _set(k, i, make):
    def mutate(state):
        state[k][i] = make(state[k][i])
    return mutate


def _bad_index(row):
    def make(g):
        indices = g._indices().clone()
        indices[0, -1] = row
        return torch.sparse_coo_tensor(indices, g._values(), g.shape, check_invariants=False)
    return make


SPARSE_BAD = [
    (_set(1, 1, _bad_index(7)), IndexError, r"grads\[1\].* 7 rows, has row indices from 0 to 7: out of range"),
    (_set(1, 1, _bad_index(-1)), IndexError, r"out of range"),
    (_set(1, 1, lambda g: g.double()), RuntimeError, r"grads\[1\] has dtype Double"),
    (_set(0, 1, lambda p: p.t().contiguous().t()), RuntimeError, r"params\[1\] must be contiguous"),
    (_set(0, 1, lambda p: p.double()), RuntimeError, r"grads\[1\] has dtype Float but its table has Double"),
    (_set(0, 1, lambda p: p.flatten()), RuntimeError, r"params\[1\] must be a 2-D table"),
    (_set(0, 1, lambda p: p.int()), RuntimeError, r"params\[1\] must be float32, float64, bfloat16 or float16"),
    (_set(2, 1, lambda s: torch.rand(7, 4)), RuntimeError, r"state_sums\[1\] must have shape \[7, 3\]"),
    (_set(2, 1, lambda s: s.t().contiguous().t()), RuntimeError, r"state_sums\[1\] must be contiguous"),
    (_set(1, 1, lambda g: g.to_dense()), RuntimeError, r"grads\[1\] must be a sparse COO tensor"),
    (_set(1, 1, lambda g: g.to_dense().to_sparse()), RuntimeError, r"sparse_dim 1, dense_dim 1"),
    (_set(3, 1, lambda s: s.double()), RuntimeError, r"state_steps\[1\] must be a one-element float32"),
    (lambda state: state[2].pop(), RuntimeError, r"state_sums must have one tensor per table \(4\), got 3"),
]


def _snapshot(state):
    out = []
    for ts in state:
        for t in ts:
            out.append(t._values().clone() if t.is_sparse else t.clone())
    return out


def _assert_unchanged(state, snapshot):
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(state), snapshot))


@pytest.mark.parametrize("mutate,error,message", SPARSE_BAD)
def test_sparse_adagrad_refuses_bad_calls_before_any_write(mutate, error, message):
    state = _state(torch.float32, rowwise=False)
    mutate(state)
    snapshot = _snapshot(state)
    with pytest.raises(error, match=message):
        _sparse_call(state)
    _assert_unchanged(state, snapshot)


@pytest.mark.parametrize("kwargs,message", [
    ({"hyper": {**SPARSE_HYPER, "weight_decay": [0.0, 0.1]}}, r"weight_decay must be 0 with sparse gradients"),
    ({"groups": [1, 2]}, r"group_sizes add up to 3 tables, but params has 4"),
    ({"lr_tensors": [None, torch.tensor([1.0, 2.0])]}, r"lr_tensors\[1\] must have one element"),
    ({"grad_scale": torch.tensor(2.0, dtype=torch.float64)}, r"grad_scale must be a one-element float32"),
    ({"found_inf": torch.tensor([0.0, 0.0])}, r"found_inf must be a one-element float32"),
])
def test_sparse_adagrad_refuses_bad_arguments_before_any_write(kwargs, message):
    state = _state(torch.float32, rowwise=False)
    snapshot = _snapshot(state)
    with pytest.raises(RuntimeError, match=message):
        _sparse_call(state, **kwargs)
    _assert_unchanged(state, snapshot)


@pytest.mark.parametrize("sparse,mutate,error,message", [
    (True, _set(2, 1, lambda s: torch.rand(7, 3)), RuntimeError, r"state_sums\[1\] must have shape \[7, 1\]"),
    (True, _set(1, 1, _bad_index(7)), IndexError, r"out of range"),
    (False, _set(2, 1, lambda s: torch.rand(7, 3)), RuntimeError, r"state_sums\[1\] must have shape \[7, 1\]"),
    (False, _set(1, 1, lambda g: g.t().contiguous().t()), RuntimeError, r"grads\[1\] must be contiguous"),
    (False, _set(1, 1, lambda g: g[:6]), RuntimeError, r"grads\[1\] must have shape \[7, 3\]"),
    (False, _set(1, 1, lambda g: g.half()), RuntimeError, r"grads\[1\] has dtype Half"),
], ids=["sparse-sum-shape", "sparse-index", "dense-sum-shape", "dense-non-contiguous", "dense-shape", "dense-dtype"])
def test_rowwise_adagrad_refuses_bad_calls_before_any_write(sparse, mutate, error, message):
    state = _state(torch.float32, rowwise=True, sparse=sparse)
    mutate(state)
    snapshot = _snapshot(state)
    with pytest.raises(error, match=message):
        _rowwise_call(state)
    _assert_unchanged(state, snapshot)


# -- registration and fake kernels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["fused_sparse_adagrad_", "fused_rowwise_adagrad_"])
def test_registered_for_cpu_and_sparse_cpu(op):
    for key in ("CPU", "SparseCPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"recap_kernels::{op}", key)


def test_opcheck_rowwise_adagrad_with_dense_gradients():
    state = _state(torch.float32, rowwise=True, sparse=False, tables=TABLES[:2])
    args = (*state, [1, 1], _hyper(ROWWISE_HYPER), [None, torch.tensor(0.01)])
    torch.library.opcheck(torch.ops.recap_kernels.fused_rowwise_adagrad_.default, args, {"maximize": True})


@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
def test_fake_kernels_check_the_call(rowwise):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.recap_kernels.fused_rowwise_adagrad_ if rowwise else torch.ops.recap_kernels.fused_sparse_adagrad_
    hyper = ROWWISE_HYPER if rowwise else SPARSE_HYPER
    state = _state(torch.float32, rowwise=rowwise)
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in ts] for ts in state]
        op(*fake, GROUPS, _hyper(hyper), [None, None], maximize=False)
        bad = [list(ts) for ts in fake]
        bad[2][1] = mode.from_tensor(torch.rand(7, 5))
        with pytest.raises(RuntimeError, match="state_sums must have shape"):
            op(*bad, GROUPS, _hyper(hyper), [None, None], maximize=False)
        with pytest.raises(RuntimeError, match="group_sizes must add up"):
            op(*fake, [1, 1], _hyper(hyper), [None, None], maximize=False)
