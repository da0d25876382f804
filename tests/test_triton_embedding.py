"""The Triton table ops (recap_kernels/_triton/embedding.py) called directly, as the triton backend calls them.

Exact sparse Adagrad is compared with torch.optim.Adagrad, row-wise Adagrad with the float64 reference
``tests.reference.rowwise_adagrad_reference``, on fresh random tables of odd sizes, uncoalesced gradients
(duplicate, unsorted rows), two param groups with their own hyperparameters, a few steps. On a machine
without a GPU these run through Triton's interpreter (see conftest.py), hence the small tables; the
``gpu`` test repeats the comparison on large ones.
"""

from __future__ import annotations

import pytest
import torch

from recap_kernels import available_backends
from tests import ptx
from tests.reference import rowwise_adagrad_reference, sparse_adagrad_reference, sparse_rows_grad, tolerances

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available_backends(DEVICE)["triton"][0],
                                reason=f"triton backend unavailable: {available_backends(DEVICE)['triton'][1]}")

TABLES = [(1, 1), (7, 3), (20, 33)]
HYPER = [{"lr": 0.2, "lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0},
         {"lr": 0.05, "lr_decay": 0.1, "eps": 1e-6, "weight_decay": 0.01}]
SPARSE_HYPER = [dict(h, weight_decay=0.0) for h in HYPER]
LOW_AND_FULL = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _embedding():
    from recap_kernels._triton import embedding

    return embedding


def _flat(hyper):
    return [float(h[k]) for h in hyper for k in ("lr", "lr_decay", "eps", "weight_decay")]


def _indices(rows, gen):
    """Unsorted row indices with repeats over the first two thirds of the table (the rest never touched),
    row 0 first and last."""
    span = max(1, 2 * rows // 3)
    return [0, *torch.randint(0, span, (rows + 2,), generator=gen).tolist(), 0]


def _sparse(rows, dim, gen, dtype):
    seed = int(torch.randint(1000, (1,), generator=gen))
    return sparse_rows_grad(rows, dim, _indices(rows, gen), dtype=dtype, seed=seed, device=DEVICE)


def _dense(rows, dim, gen, dtype):
    return torch.randn(rows, dim, generator=gen).to(dtype).to(DEVICE)


def _state(dtype, gen, tables=TABLES, *, rowwise, init=0.25):
    params = [torch.randn(rows, dim, generator=gen).to(dtype).to(DEVICE) for rows, dim in tables]
    sums = [torch.full((rows, 1) if rowwise else (rows, dim), init, dtype=dtype, device=DEVICE) for rows, dim in tables]
    steps = [torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in tables]
    return params, sums, steps


def _untouched(rows):
    return slice(max(1, 2 * rows // 3), None)


def _clone(ts):
    return [t.clone() for t in ts]


# ------------------------------------------------------------------------------------------------
# Exact sparse Adagrad against torch.optim.Adagrad
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", LOW_AND_FULL, ids=str)
def test_sparse_adagrad_is_torchs(dtype, maximize):
    """float32/float64: torch.optim.Adagrad itself. bf16/fp16: its math in float64, rounded once per store
    (``sparse_adagrad_reference``; torch rounds every intermediate to the table's dtype)."""
    gen = torch.Generator().manual_seed(0)
    params, sums, steps = _state(dtype, gen, rowwise=False, init=0.1)
    ref_params = [p.clone().requires_grad_() for p in params]
    ref = torch.optim.Adagrad([{"params": ref_params[:1], **SPARSE_HYPER[0]}, {"params": ref_params[1:],
                               **SPARSE_HYPER[1]}], initial_accumulator_value=0.1, maximize=maximize)
    low = dtype in (torch.bfloat16, torch.float16)
    ref_sums, ref_steps = _clone(sums), _clone(steps)
    for _ in range(3):
        grads = [_sparse(rows, dim, gen, dtype) for rows, dim in TABLES]
        if low:
            for i, g in enumerate(grads):
                h = SPARSE_HYPER[min(i, 1)]
                sparse_adagrad_reference(ref_params[i].data, ref_sums[i], ref_steps[i], g, lr=h["lr"],
                                         lr_decay=h["lr_decay"], eps=h["eps"], maximize=maximize)
        else:
            for r, g in zip(ref_params, grads):
                r.grad = g.clone()
            ref.step()
        _embedding().sparse_adagrad_step(params, grads, sums, steps, [1, 2], _flat(SPARSE_HYPER), [None, None],
                                         maximize=maximize)
    if not low:
        ref_sums = [ref.state[r]["sum"] for r in ref_params]
    tol = tolerances(dtype)
    for p, s, step, r, rs in zip(params, sums, steps, ref_params, ref_sums):
        torch.testing.assert_close(p, r.detach(), **tol)
        torch.testing.assert_close(s, rs, **tol)
        assert float(step) == 3.0
        assert torch.equal(p[_untouched(p.shape[0])], r.detach()[_untouched(p.shape[0])])
        assert torch.equal(s[_untouched(p.shape[0])], rs[_untouched(p.shape[0])])


# ------------------------------------------------------------------------------------------------
# Row-wise Adagrad against the float64 reference
# ------------------------------------------------------------------------------------------------
def _rowwise_run(dtype, *, sparse, maximize=False, tables=TABLES, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    params, sums, counters = _state(dtype, gen, tables, rowwise=True)
    ref, ref_sums, ref_steps = _clone(params), _clone(sums), _clone(counters)
    for _ in range(steps):
        grads = [(_sparse if sparse else _dense)(rows, dim, gen, dtype) for rows, dim in tables]
        _embedding().rowwise_adagrad_step(params, _clone(grads), sums, counters, [1, len(tables) - 1], _flat(HYPER),
                                          [None, None], maximize=maximize)
        for i, g in enumerate(grads):
            rowwise_adagrad_reference(ref[i], ref_sums[i], ref_steps[i], g, maximize=maximize, **HYPER[min(i, 1)])
    return (params, sums, counters), (ref, ref_sums, ref_steps)


def _assert_rowwise_close(got, want, dtype, *, sparse):
    tol = tolerances(dtype)
    for p, s, step, r, rs, rstep in zip(*got, *want):
        torch.testing.assert_close(p, r, **tol)
        torch.testing.assert_close(s, rs, **tol)
        assert float(step) == float(rstep)
        if sparse:
            assert torch.equal(p[_untouched(p.shape[0])], r[_untouched(p.shape[0])])
            assert torch.equal(s[_untouched(p.shape[0])], rs[_untouched(p.shape[0])])


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", LOW_AND_FULL, ids=str)
def test_rowwise_adagrad_is_the_reference(dtype, sparse):
    got, want = _rowwise_run(dtype, sparse=sparse)
    _assert_rowwise_close(got, want, dtype, sparse=sparse)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_rowwise_adagrad_maximize(sparse):
    got, want = _rowwise_run(torch.float32, sparse=sparse, maximize=True)
    _assert_rowwise_close(got, want, torch.float32, sparse=sparse)


@pytest.mark.parametrize("kind", ["sparse-exact", "rowwise-sparse", "rowwise-dense"])
def test_rows_wider_than_one_block_take_two_passes(monkeypatch, kind):
    """Rows of 33 columns in blocks of 8 (the loops over a row's blocks) give what one block gives; dense
    tables in blocks of 2 rows (the last one partial) or of one."""
    embedding = _embedding()
    tables = [(5, 33), (3, 8)]
    results = []
    for block in (64, 8):
        monkeypatch.setattr(embedding, "MAX_BLOCK_D", block)
        monkeypatch.setattr(embedding, "_INTERPRETER_MAX_BLOCK_D", block)
        for name in ("_ELEMENTS_PER_PROGRAM", "_INTERPRETER_ELEMENTS_PER_PROGRAM"):
            monkeypatch.setattr(embedding, name, 16)
        gen = torch.Generator().manual_seed(3)
        rowwise = kind != "sparse-exact"
        params, sums, steps = _state(torch.float32, gen, tables, rowwise=rowwise)
        hyper = HYPER if rowwise else SPARSE_HYPER
        for _ in range(2):
            make = _dense if kind == "rowwise-dense" else _sparse
            grads = [make(r, d, gen, torch.float32) for r, d in tables]
            op = embedding.rowwise_adagrad_step if rowwise else embedding.sparse_adagrad_step
            op(params, grads, sums, steps, [1, 1], _flat(hyper), [None, None], maximize=False)
        results.append(params + sums)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the mean's sum in another order


@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse-exact", "rowwise"])
def test_coalesced_and_strided_sparse_gradients(rowwise):
    """A coalesced gradient skips the sort; values that are a transposed view are read through their strides."""
    embedding = _embedding()
    op = embedding.rowwise_adagrad_step if rowwise else embedding.sparse_adagrad_step
    gen = torch.Generator().manual_seed(4)
    grad = _sparse(20, 33, gen, torch.float32)
    strided = torch.sparse_coo_tensor(grad._indices(), grad._values().t().contiguous().t(), grad.shape,
                                      check_invariants=False)
    outs = []
    for g in (grad, grad.coalesce(), strided):
        params, sums, steps = _state(torch.float32, torch.Generator().manual_seed(5), [(20, 33)], rowwise=rowwise)
        op(params, [g], sums, steps, [1], _flat(SPARSE_HYPER[:1]), [None], maximize=False)
        outs.append(params + sums)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # coalesce sums duplicates in its own order


@pytest.mark.parametrize("dup", [1, 8, 16])
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse-exact", "rowwise"])
def test_a_hot_row_sums_its_duplicates_in_blocks(monkeypatch, rowwise, dup):
    """A row named 37 times (blocks of ``DUP`` duplicates, the last one partial) among rows named once,
    scaled gradients: the reference's numbers, and every value row stored back unscaled."""
    embedding = _embedding()
    monkeypatch.setattr(embedding, "DUP", dup)
    gen = torch.Generator().manual_seed(12)
    indices = [3] * 37 + [0, 5, 9, 11]
    order = torch.randperm(len(indices), generator=gen).tolist()
    grad = sparse_rows_grad(12, 5, [indices[i] for i in order], device=DEVICE)
    params, sums, steps = _state(torch.float32, gen, [(12, 5)], rowwise=rowwise)
    ref, ref_sums, ref_steps = _clone(params), _clone(sums), _clone(steps)
    hyper = SPARSE_HYPER[1]
    op = embedding.rowwise_adagrad_step if rowwise else embedding.sparse_adagrad_step
    scaled = _scaled(grad, 4.0)
    op(params, [scaled], sums, steps, [1], _flat([hyper]), [None], maximize=False,
       grad_scale=torch.tensor(4.0, device=DEVICE))
    assert torch.equal(scaled._values(), grad._values())
    reference = rowwise_adagrad_reference if rowwise else sparse_adagrad_reference
    reference(ref[0], ref_sums[0], ref_steps[0], grad, lr=hyper["lr"], lr_decay=hyper["lr_decay"], eps=hyper["eps"])
    torch.testing.assert_close(params[0], ref[0])
    torch.testing.assert_close(sums[0], ref_sums[0])
    assert float(steps[0]) == 1.0


# ------------------------------------------------------------------------------------------------
# lr as a Tensor, AMP, empty gradients
# ------------------------------------------------------------------------------------------------
def _one_call(op, *, rowwise, sparse=True, lr_tensors=(None, None), lr=0.25, grad_scale=None, found_inf=None,
              scale=1.0, dtype=torch.float32, seed=6):
    gen = torch.Generator().manual_seed(seed)
    params, sums, steps = _state(dtype, gen, rowwise=rowwise)
    grads = [(_sparse if sparse else _dense)(r, d, gen, dtype) for r, d in TABLES]
    grads = [_scaled(g, scale) for g in grads]
    hyper = [dict(h, lr=lr) for h in (HYPER if rowwise else SPARSE_HYPER)]
    op(params, grads, sums, steps, [1, 2], _flat(hyper), list(lr_tensors), maximize=False, grad_scale=grad_scale,
       found_inf=found_inf)
    return params, sums, steps, grads


def _scaled(g, scale):
    """``g * scale``, a sparse gradient kept uncoalesced."""
    if g.is_sparse:
        return torch.sparse_coo_tensor(g._indices(), g._values() * scale, g.shape, check_invariants=False)
    return g * scale


OPS = [("sparse-exact", False, True), ("rowwise-sparse", True, True), ("rowwise-dense", True, False)]


def _op(rowwise):
    return _embedding().rowwise_adagrad_step if rowwise else _embedding().sparse_adagrad_step


@pytest.mark.parametrize("name, rowwise, sparse", OPS, ids=[o[0] for o in OPS])
def test_tensor_lr_is_read_on_the_device(name, rowwise, sparse):
    """A Tensor lr (float32 or float64, one group each) gives what the same float gives, and a new value
    written into it in place is the next call's."""
    op = _op(rowwise)
    want = _one_call(op, rowwise=rowwise, sparse=sparse, lr=0.25)
    lrs = [torch.tensor(0.25, device=DEVICE), torch.tensor([0.25], dtype=torch.float64, device=DEVICE)]
    got = _one_call(op, rowwise=rowwise, sparse=sparse, lr=99.0, lr_tensors=lrs)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)
    for lr in lrs:
        lr.fill_(0.5)
    want = _one_call(op, rowwise=rowwise, sparse=sparse, lr=0.5)
    got = _one_call(op, rowwise=rowwise, sparse=sparse, lr=99.0, lr_tensors=lrs)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)


def _values(grads):
    return [g._values() if g.is_sparse else g for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, rowwise, sparse", OPS, ids=[o[0] for o in OPS])
def test_grad_scale_divides_gradients_and_stores_them_unscaled(name, rowwise, sparse, dtype):
    op = _op(rowwise)
    want = _one_call(op, rowwise=rowwise, sparse=sparse, dtype=dtype)
    scale = torch.tensor([1024.0], device=DEVICE)  # a power of two: unscaling is exact
    got = _one_call(op, rowwise=rowwise, sparse=sparse, dtype=dtype, scale=1024.0, grad_scale=scale,
                    found_inf=torch.zeros(1, device=DEVICE))
    for a, b in zip(got[0] + got[1] + got[2], want[0] + want[1] + want[2]):
        assert torch.equal(a, b)
    for a, b in zip(_values(got[3]), _values(want[3])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, rowwise, sparse", OPS, ids=[o[0] for o in OPS])
def test_found_inf_changes_nothing(name, rowwise, sparse):
    op = _op(rowwise)
    gen = torch.Generator().manual_seed(6)
    before = _state(torch.float32, gen, rowwise=rowwise)
    got = _one_call(op, rowwise=rowwise, sparse=sparse, scale=1024.0, grad_scale=torch.tensor([1024.0], device=DEVICE),
                    found_inf=torch.ones(1, device=DEVICE))
    for a, b in zip(got[0] + got[1] + got[2], before[0] + before[1] + before[2]):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(6)
    _state(torch.float32, gen, rowwise=rowwise)
    scaled = [_scaled((_sparse if sparse else _dense)(r, d, gen, torch.float32), 1024.0) for r, d in TABLES]
    for a, b in zip(_values(got[3]), _values(scaled)):
        assert torch.equal(a, b)  # still scaled: GradScaler skips the step


@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse-exact", "rowwise"])
def test_an_empty_sparse_gradient_only_advances_step(rowwise):
    gen = torch.Generator().manual_seed(7)
    params, sums, steps = _state(torch.float32, gen, rowwise=rowwise)
    before = _clone(params) + _clone(sums)
    empty = [torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, d), (r, d)).to(DEVICE)
             for r, d in TABLES]
    for _ in range(2):
        _op(rowwise)(params, empty, sums, steps, [1, 2], _flat(SPARSE_HYPER), [None, None], maximize=False)
    assert all(torch.equal(a, b) for a, b in zip(params + sums, before))
    assert [float(s) for s in steps] == [2.0, 2.0, 2.0]


def test_no_tables_is_a_no_op():
    for rowwise in (False, True):
        _op(rowwise)([], [], [], [], [], [], [], maximize=False)
        _op(rowwise)([], [], [], [], [0], _flat(HYPER[:1]), [None], maximize=False)


@pytest.mark.parametrize("family", ["adagrad", "rowwise"])
def test_optimizers_step_tables_with_a_scaler_like_the_torch_backend(family):
    """Through the optimizers (what GradScaler.step hands a fused optimizer), against the torch backend:
    the overflow step skipped, steps counted without it, scaled gradients unscaled in place."""
    from recap_kernels import optim

    cls = optim.Adagrad if family == "adagrad" else optim.RowWiseAdagrad
    gen = torch.Generator().manual_seed(10)
    init = [torch.randn(r, d, generator=gen).to(DEVICE) for r, d in TABLES]
    runs = {}
    for backend in ("torch", "triton"):
        params = [t.clone().requires_grad_() for t in init]
        opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.05, "lr_decay": 0.1}], lr=0.2,
                  backend=backend)
        step_gen = torch.Generator().manual_seed(11)
        grads = []
        for step in range(3):
            for p, (r, d) in zip(params, TABLES):
                p.grad = _scaled(_sparse(r, d, step_gen, torch.float32), 1024.0)
            opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
            opt.found_inf = torch.tensor(1.0 if step == 1 else 0.0, device=DEVICE)
            opt.step()
            del opt.grad_scale, opt.found_inf
            grads.append([p.grad._values().clone() for p in params])
        assert opt.backends_used() == {backend}
        runs[backend] = (params, [opt.state[p]["sum"] for p in params], [opt.state[p]["step"] for p in params], grads)
    (params, sums, steps, grads), (ref_params, ref_sums, ref_steps, ref_grads) = runs["triton"], runs["torch"]
    for a, b in zip(params + sums, ref_params + ref_sums):
        torch.testing.assert_close(a.detach(), b.detach())
    assert [float(s) for s in steps] == [float(s) for s in ref_steps] == [2.0] * len(TABLES)
    for step_grads, ref_step_grads in zip(grads, ref_grads):
        for a, b in zip(step_grads, ref_step_grads):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Validation: a call that raises writes nothing
# ------------------------------------------------------------------------------------------------
def _valid_call(rowwise):
    gen = torch.Generator().manual_seed(8)
    params, sums, steps = _state(torch.float32, gen, [(6, 3), (4, 2)], rowwise=rowwise)
    grads = [sparse_rows_grad(6, 3, [1, 4, 1], device=DEVICE), sparse_rows_grad(4, 2, [0, 3], device=DEVICE)]
    args = dict(params=params, grads=grads, sums=sums, steps=steps, group_sizes=[1, 1],
                hyper=_flat(SPARSE_HYPER), lr_tensors=[None, None])
    return args, dict(maximize=False, grad_scale=torch.ones(1, device=DEVICE), found_inf=torch.zeros(1, device=DEVICE))


def _bad(name, change):
    return pytest.param(change, id=name)


BAD_CALLS = [
    _bad("fewer-sums", lambda a, k: a.update(sums=a["sums"][:1])),
    _bad("group-sizes", lambda a, k: a.update(group_sizes=[1, 2])),
    _bad("hyper-length", lambda a, k: a.update(hyper=a["hyper"][:7])),
    _bad("lr-tensors-length", lambda a, k: a.update(lr_tensors=[None])),
    _bad("grad-dtype", lambda a, k: a["grads"].__setitem__(1, a["grads"][1].double())),
    _bad("int-table", lambda a, k: a["params"].__setitem__(1, a["params"][1].long())),
    _bad("strided-table", lambda a, k: a["params"].__setitem__(1, a["params"][1].t().contiguous().t())),
    _bad("sum-shape", lambda a, k: a["sums"].__setitem__(1, a["sums"][1].reshape(-1)[:1].clone())),
    _bad("step-dtype", lambda a, k: a["steps"].__setitem__(1, a["steps"][1].double())),
    _bad("step-shape", lambda a, k: a["steps"].__setitem__(1, a["steps"][1].reshape(1))),
    _bad("grad-shape", lambda a, k: a["grads"].__setitem__(1, sparse_rows_grad(4, 3, [0], device=DEVICE))),
    _bad("sparse-dim-2", lambda a, k: a["grads"].__setitem__(1, torch.randn(4, 2, device=DEVICE).to_sparse())),
    _bad("lr-tensor-size", lambda a, k: a.update(lr_tensors=[None, torch.ones(2, device=DEVICE)])),
    _bad("grad-scale-size", lambda a, k: k.update(grad_scale=torch.ones(2, device=DEVICE))),
    _bad("found-inf-int", lambda a, k: k.update(found_inf=torch.zeros(1, dtype=torch.int64, device=DEVICE))),
]


def _snapshot(args):
    grads = [g._values() if g.is_sparse else g for g in args["grads"]]
    return [t.clone() for t in args["params"] + args["sums"] + args["steps"] + grads]


@pytest.mark.parametrize("change", BAD_CALLS)
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse-exact", "rowwise"])
def test_bad_calls_raise_before_any_write(rowwise, change):
    args, kwargs = _valid_call(rowwise)
    change(args, kwargs)
    before = _snapshot(args)
    with pytest.raises((TypeError, ValueError)):
        _op(rowwise)(**args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(args), before))


@pytest.mark.parametrize("indices", [[0, 4], [-1, 2]], ids=["past-the-end", "negative"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse-exact", "rowwise"])
def test_a_row_index_out_of_range_raises_before_any_write(rowwise, indices):
    args, kwargs = _valid_call(rowwise)
    args["grads"][1] = sparse_rows_grad(4, 2, indices, device=DEVICE)
    before = _snapshot(args)
    with pytest.raises(IndexError, match="out of range"):
        _op(rowwise)(**args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(args), before))


def test_sparse_adagrad_rejects_weight_decay_and_dense_gradients():
    args, kwargs = _valid_call(False)
    before = _snapshot(args)
    with pytest.raises(ValueError, match="weight_decay"):
        _op(False)(**dict(args, hyper=_flat(HYPER)), **kwargs)
    args["grads"][1] = torch.randn(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="sparse COO"):
        _op(False)(**args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(args)[:-1], before[:-1]))


# ------------------------------------------------------------------------------------------------
# What the GPU runs
# ------------------------------------------------------------------------------------------------
_PTX_SCRIPT = r"""
import json
import triton.language as tl
from recap_kernels._triton.embedding import _dense_rowwise_kernel, _sparse_kernel
from tests.ptx import op_counts

COMMON = {"step_ptr": "*fp32", "hyper_ptr": "*fp64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
          "found_inf_ptr": "*fp32", "dim": "i32", "group": "i32"}
SPARSE = {"p_ptr": "*bf16", "sum_ptr": "*bf16", "values_ptr": "*bf16", "sorted_ptr": "*i64", "perm_ptr": "*i64",
          "nnz": "i32", "value_row_stride": "i64", "value_col_stride": "i64", **COMMON}
DENSE = {"p_ptr": "*bf16", "sum_ptr": "*bf16", "g_ptr": "*bf16", "num_rows": "i32", **COMMON}
OPS = ("div.full", "div.approx", "sqrt.approx", "rsqrt", "mul.f32", "add.f32", "sub.f32", "div.rn.f32",
       "sqrt.rn.f32")

def counts(kernel, signature, constexprs):
    constexprs = {**constexprs, "DTYPE": tl.bfloat16, "MATH_DTYPE": tl.float32, "MAXIMIZE": True,
                  "HAS_LR_TENSOR": True, "HAS_GRAD_SCALE": True, "HAS_FOUND_INF": True}
    return op_counts(kernel, signature, constexprs, OPS, num_warps=2)

out = {}
for rowwise in (False, True):
    for one_block in (False, True):
        out[f"sparse-{rowwise}-{one_block}"] = counts(_sparse_kernel, SPARSE, {
            "ROWWISE": rowwise, "PERMUTED": True, "BLOCK_D": 128, "ONE_BLOCK": one_block, "DUP": 8})
for one_block in (False, True):
    out[f"dense-{one_block}"] = counts(_dense_rowwise_kernel, DENSE, {"BLOCK_R": 4, "BLOCK_D": 64,
                                                                       "ONE_BLOCK": one_block})
print(json.dumps(out))
"""


def test_sm90_ptx_compiles_with_ieee_division_and_square_root():
    """Every kernel variant compiles for sm_90 (in a process without the interpreter: no GPU needed), with
    correctly rounded fp32 division and square root only, and nothing Triton or ptxas may contract."""
    found = ptx.run(_PTX_SCRIPT)
    for name, counts in found.items():
        assert counts["div.rn.f32"] > 0 and counts["sqrt.rn.f32"] > 0, (name, counts)
        for op in ("div.full", "div.approx", "sqrt.approx", "rsqrt", "mul.f32", "add.f32", "sub.f32"):
            assert counts[op] == 0, (name, op, counts)


def _skewed_tables_check(device, dtype, shapes):
    """``(rows, dim, nnz)`` tables, three steps of skewed sparse gradients (a few hot rows take many of the
    entries), against float64 math rounded once per store: exact sparse Adagrad (torch's sparse branch,
    vectorized) and row-wise Adagrad with sparse and dense gradients (the torch backend's float math)."""
    from recap_kernels.backends.torch_optim import rowwise_adagrad

    embedding = _embedding()
    gen = torch.Generator().manual_seed(9)
    # Hot rows sum thousands of entries, in float32 in another order than the reference's.
    tol = tolerances(dtype) or {"rtol": 1e-5, "atol": 1e-6}
    for rows, dim, nnz in shapes:
        init = torch.randn(rows, dim, generator=gen).to(dtype).to(device)
        grads = []
        for _ in range(3):
            index = (torch.rand(nnz, generator=gen) ** 3 * rows).long().reshape(1, -1)
            grads.append(torch.sparse_coo_tensor(index, torch.randn(nnz, dim, generator=gen).to(dtype),
                                                 (rows, dim)).to(device))
        # exact sparse Adagrad
        p, s, step = init.clone(), torch.zeros_like(init), torch.zeros((), device=device)
        ref_p, ref_s = init.clone(), torch.zeros_like(init)
        for n, g in enumerate(grads, start=1):
            embedding.sparse_adagrad_step([p], [g.clone()], [s], [step], [1], [0.1, 0.01, 1e-10, 0.0], [None],
                                          maximize=False)
            clr = 0.1 / (1 + (n - 1) * 0.01)
            summed = torch.sparse_coo_tensor(g._indices(), g._values().double(), g.shape).coalesce()
            r, v = summed.indices()[0], summed.values()
            acc = ref_s[r].double() + v * v
            ref_s[r] = acc.to(dtype)
            ref_p[r] = (ref_p[r].double() - clr * v / (acc.sqrt() + 1e-10)).to(dtype)
        torch.testing.assert_close(p, ref_p, **tol)
        torch.testing.assert_close(s, ref_s, **tol)
        assert float(step) == 3.0
        # row-wise, sparse and dense
        for sparse in (True, False):
            want = [init.clone(), torch.zeros(rows, 1, dtype=dtype, device=device), torch.zeros((), device=device)]
            got = [t.clone() for t in want]
            for g in grads:
                g = g if sparse else g.to_dense()
                rowwise_adagrad([want[0]], [g.clone()], [want[1]], [want[2]], lr=0.1, lr_decay=0.01, weight_decay=0.01,
                                eps=1e-8, maximize=False)
                embedding.rowwise_adagrad_step([got[0]], [g.clone()], [got[1]], [got[2]], [1],
                                               [0.1, 0.01, 1e-8, 0.01], [None], maximize=False)
            torch.testing.assert_close(got[0], want[0], **tol)
            torch.testing.assert_close(got[1], want[1], **tol)


def test_skewed_gradients_against_vectorized_references(monkeypatch):
    """The large-table check in miniature: hot rows, rows in three blocks of 16."""
    monkeypatch.setattr(_embedding(), "_INTERPRETER_MAX_BLOCK_D", 16)
    monkeypatch.setattr(_embedding(), "MAX_BLOCK_D", 16)
    _skewed_tables_check(DEVICE, torch.float32, [(60, 16, 90), (9, 40, 20)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_tables_on_cuda(dtype):
    """Tables of the size the kernels are for: 50,000 skewed entries into 20,000 rows of 128, and 900 into
    300 rows of 1,500 columns (two passes over each row)."""
    _skewed_tables_check("cuda", dtype, [(20_000, 128, 50_000), (300, 1500, 900)])


@pytest.mark.gpu
def test_tensor_lr_and_amp_on_cuda():
    """The device reads (Tensor lr, grad_scale, found_inf) where bench/gpu_check.sh runs only ``gpu`` tests."""
    assert DEVICE == "cuda"
    for name, rowwise, sparse in OPS:
        test_tensor_lr_is_read_on_the_device(name, rowwise, sparse)
        test_found_inf_changes_nothing(name, rowwise, sparse)
        test_grad_scale_divides_gradients_and_stores_them_unscaled(name, rowwise, sparse, torch.bfloat16)
