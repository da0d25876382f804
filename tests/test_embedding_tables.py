"""Embedding tables through the optimizers: Adagrad with sparse gradients and RowWiseAdagrad, on every
backend that runs them here (Note [Table steps] in recap_kernels/backends/_base.py).

Exact sparse Adagrad is compared with torch.optim.Adagrad; row-wise Adagrad with the float64 reference
``tests.reference.rowwise_adagrad_reference`` (FBGEMM's EXACT_ROWWISE_ADAGRAD). Tables of odd sizes,
repeated and unsorted row indices, rows never touched, several steps, param groups with their own
hyperparameters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from recap_kernels import BackendUnavailableError, optim
from recap_kernels.backends import BucketKey, get_backend
from recap_kernels.backends._base import SPARSE
from tests.reference import rowwise_adagrad_reference, sparse_adagrad_reference, sparse_rows_grad, tolerances

CPU = torch.device("cpu")


def _table_backends(kind: str, layout: str) -> list[str]:
    """Backends that run this kind of table step on CPU tensors here (the torch backend always does)."""
    key = BucketKey(CPU, torch.float32, layout)
    names = []
    for name in ("torch", "cpu", "triton"):
        backend = get_backend(name)
        if backend.available(CPU).ok and backend.supports(kind, key, [{}]).ok:
            names.append(name)
    return names


SPARSE_BACKENDS = _table_backends("adagrad", SPARSE)
ROWWISE_BACKENDS = sorted(set(_table_backends("rowwise_adagrad", SPARSE)) | {"torch"})
# (rows, dim) of the tables; the Triton interpreter gets the small ones only.
TABLES = [(1, 1), (7, 3), (300, 64), (40, 129)]


def _indices(rows: int, n: int, gen: torch.Generator) -> list[int]:
    """``n`` unsorted row indices with repeats, over the first two thirds of the table (the rest is never
    touched), always including row 0 twice."""
    span = max(1, 2 * rows // 3)
    return [0, *torch.randint(0, span, (n,), generator=gen).tolist(), 0]


def _grads(tables, steps, gen, *, dtype, sparse=True):
    out = []
    for step in range(steps):
        row = []
        for t, (rows, dim) in enumerate(tables):
            if sparse:
                row.append(sparse_rows_grad(rows, dim, _indices(rows, 2 * rows + 3, gen), dtype=dtype,
                                            seed=100 * step + t))
            else:
                row.append(torch.randn(rows, dim, generator=gen).to(dtype))
        out.append(row)
    return out


def _tables(dtype, gen, tables=TABLES):
    return [torch.randn(rows, dim, generator=gen).to(dtype) for rows, dim in tables]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_adagrad_with_sparse_gradients_is_torchs(backend, dtype):
    """torch.optim.Adagrad's step; for bfloat16 tables on a kernel backend, its float64 form rounded once
    per store (``sparse_adagrad_reference``): the kernels compute in float, where torch's bfloat16 step
    rounds every intermediate (its sums drift a few ulps from the exact ones)."""
    gen = torch.Generator().manual_seed(0)
    tables = TABLES[:2] if backend == "triton" else TABLES
    init = _tables(dtype, gen, tables)
    ref_params = [t.clone().requires_grad_() for t in init]
    params = [t.clone().requires_grad_() for t in init]
    hyper = [{"lr": 0.1, "lr_decay": 0.0, "eps": 1e-10}, {"lr": 0.05, "lr_decay": 0.1, "eps": 1e-6}]

    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], **hyper[1]}]

    kwargs = {"lr": 0.1, "initial_accumulator_value": 0.1}
    ref = torch.optim.Adagrad(groups(ref_params), **kwargs)
    opt = optim.Adagrad(groups(params), backend=backend, **kwargs)
    exact = dtype == torch.bfloat16 and backend != "torch"
    for grads in _grads(tables, 4, gen, dtype=dtype):
        for r, p, g in zip(ref_params, params, grads):
            r.grad, p.grad = g.clone(), g.clone()
        if exact:
            with torch.no_grad():
                for i, (r, g) in enumerate(zip(ref_params, grads)):
                    sparse_adagrad_reference(r, ref.state[r]["sum"], ref.state[r]["step"], g, **hyper[min(i, 1)])
        else:
            ref.step()
        opt.step()
    assert opt.backends_used() == {backend}
    tol = tolerances(dtype)
    for r, p in zip(ref_params, params):
        torch.testing.assert_close(p.detach(), r.detach(), **tol)
        torch.testing.assert_close(opt.state[p]["sum"], ref.state[r]["sum"], **tol)
        torch.testing.assert_close(opt.state[p]["step"].cpu().double(), ref.state[r]["step"].double())
        untouched = slice(max(1, 2 * p.shape[0] // 3), None)  # rows no gradient ever named: bit for bit
        assert torch.equal(p.detach()[untouched], r.detach()[untouched])


def _rowwise_run(backend, dtype, *, sparse, steps=4, tables=TABLES, maximize=False, tensor_lr=False):
    gen = torch.Generator().manual_seed(1)
    init = _tables(dtype, gen, tables)
    params = [t.clone().requires_grad_() for t in init]
    lr = torch.tensor(0.2) if tensor_lr else 0.2
    hyper = [{"lr": 0.2, "lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10},
             {"lr": 0.05, "lr_decay": 0.1, "weight_decay": 0.01, "eps": 1e-6}]
    opt = optim.RowWiseAdagrad([{"params": params[:1], "lr": lr}, {"params": params[1:], **hyper[1]}],
                               initial_accumulator_value=0.25, maximize=maximize, backend=backend)
    # the reference, per table
    ref = [t.clone() for t in init]
    ref_sums = [torch.full((t.shape[0], 1), 0.25, dtype=dtype) for t in init]
    ref_steps = [torch.tensor(0.0) for _ in init]
    for grads in _grads(tables, steps, gen, dtype=dtype, sparse=sparse):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            rowwise_adagrad_reference(ref[i], ref_sums[i], ref_steps[i], g, maximize=maximize, **hyper[min(i, 1)])
    return opt, params, ref, ref_sums


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ROWWISE_BACKENDS)
def test_rowwise_adagrad_is_the_reference(backend, dtype, sparse):
    tables = TABLES[:2] if backend == "triton" else TABLES
    opt, params, ref, ref_sums = _rowwise_run(backend, dtype, sparse=sparse, tables=tables)
    assert opt.backends_used() == {backend}
    tol = tolerances(dtype)
    for p, r, s in zip(params, ref, ref_sums):
        torch.testing.assert_close(p.detach(), r, **tol)
        torch.testing.assert_close(opt.state[p]["sum"], s, **tol)
        assert opt.state[p]["sum"].shape == (p.shape[0], 1)
        assert float(opt.state[p]["step"]) == 4.0
        if sparse:
            untouched = slice(max(1, 2 * p.shape[0] // 3), None)
            assert torch.equal(p.detach()[untouched], r[untouched])


@pytest.mark.parametrize("backend", ROWWISE_BACKENDS)
def test_rowwise_adagrad_maximize_and_tensor_lr(backend):
    opt, params, ref, ref_sums = _rowwise_run(backend, torch.float32, sparse=True, tables=TABLES[:2], maximize=True,
                                              tensor_lr=True)
    for p, r, s in zip(params, ref, ref_sums):
        torch.testing.assert_close(p.detach(), r)
        torch.testing.assert_close(opt.state[p]["sum"], s)


def test_rowwise_adagrad_state_dict_is_torchrecs_layout_both_ways():
    """A checkpoint in torchrec's layout (``step`` a host float tensor, ``sum`` (rows, 1)) loads, and ours
    saves the same keys and shapes; resuming gives the numbers of an uninterrupted run."""
    gen = torch.Generator().manual_seed(2)
    init = _tables(torch.float32, gen, TABLES[1:3])
    grads = _grads(TABLES[1:3], 4, gen, dtype=torch.float32)
    straight = [t.clone().requires_grad_() for t in init]
    opt = optim.RowWiseAdagrad(straight, lr=0.1, weight_decay=0.01)
    for step in grads:
        for p, g in zip(straight, step):
            p.grad = g.clone()
        opt.step()
    resumed = [t.clone().requires_grad_() for t in init]
    first = optim.RowWiseAdagrad(resumed, lr=0.1, weight_decay=0.01)
    for step in grads[:2]:
        for p, g in zip(resumed, step):
            p.grad = g.clone()
        first.step()
    saved = copy.deepcopy(first.state_dict())
    for state in saved["state"].values():  # as torchrec keeps it
        assert set(state) == {"step", "sum"}
        state["step"] = torch.tensor(float(state["step"]))
    second = optim.RowWiseAdagrad(resumed, lr=0.1, weight_decay=0.01)
    second.load_state_dict(saved)
    for step in grads[2:]:
        for p, g in zip(resumed, step):
            p.grad = g.clone()
        second.step()
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert second.state[b]["sum"].shape == (b.shape[0], 1)


def test_rowwise_adagrad_arguments_are_torchrecs():
    table = torch.randn(4, 3, requires_grad=True)
    for kwargs, message in [({"lr": -1.0}, "Invalid learning rate"), ({"lr_decay": -1.0}, "Invalid lr_decay"),
                            ({"weight_decay": -1.0}, "Invalid weight_decay"), ({"eps": -1.0}, "Invalid epsilon"),
                            ({"initial_accumulator_value": -1.0}, "Invalid initial_accumulator_value")]:
        with pytest.raises(ValueError, match=message):
            optim.RowWiseAdagrad([table], **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        optim.RowWiseAdagrad([torch.randn(5, requires_grad=True)])
    opt = optim.RowWiseAdagrad([table], initial_accumulator_value=0.5)
    assert torch.equal(opt.state[table]["sum"], torch.full((4, 1), 0.5))


def _dense_and_table(family_cls, **kwargs):
    dense = torch.randn(5, requires_grad=True)
    table = torch.randn(6, 3, requires_grad=True)
    opt = family_cls([{"params": [dense]}, {"params": [table]}], **kwargs)
    dense.grad = torch.randn(5)
    table.grad = sparse_rows_grad(6, 3, [1, 4, 1])
    opt.step()
    return opt, dense, table


def _snapshot(opt, params):
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]


@pytest.mark.parametrize("family", ["adagrad", "rowwise"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_row_index_out_of_range_raises_before_anything_is_written(backend, family):
    cls = optim.Adagrad if family == "adagrad" else optim.RowWiseAdagrad
    if family == "rowwise":  # a dense parameter is not a table: give RowWiseAdagrad two tables
        tables = [torch.randn(6, 3, requires_grad=True), torch.randn(4, 2, requires_grad=True)]
        opt = cls(tables, backend=backend)
        params = tables
        params[0].grad, params[1].grad = torch.randn(6, 3), sparse_rows_grad(4, 2, [0, 3])
        opt.step()
        params[0].grad = torch.randn(6, 3)
        params[1].grad = sparse_rows_grad(4, 2, [1, 4])  # row 4 of 4
    else:
        opt, dense, table = _dense_and_table(cls, backend=backend)
        params = [dense, table]
        dense.grad = torch.randn(5)
        table.grad = sparse_rows_grad(6, 3, [2, -1])
    before = _snapshot(opt, params)
    with pytest.raises(IndexError, match="out of range"):
        opt.step()
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("family", ["adagrad", "rowwise"])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_a_row_index_out_of_range_in_a_step_of_tables_alone_writes_nothing(backend, family):
    """Tables alone in a step (one bucket, one run): the native ops' own index check, before any write, is
    the step's (Note [Table steps])."""
    cls = optim.Adagrad if family == "adagrad" else optim.RowWiseAdagrad
    tables = [torch.randn(6, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    opt = cls(tables, lr=0.1, backend=backend)
    tables[0].grad, tables[1].grad = sparse_rows_grad(6, 3, [0, 5, 5]), sparse_rows_grad(4, 3, [3])
    opt.step()
    tables[0].grad, tables[1].grad = sparse_rows_grad(6, 3, [1, 2]), sparse_rows_grad(4, 3, [0, 4])  # row 4 of 4
    before = _snapshot(opt, tables)
    with pytest.raises(IndexError, match="out of range"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(opt, tables), before))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_an_empty_sparse_gradient_only_advances_step(backend):
    ref_p, p = torch.randn(5, 2).requires_grad_(), None
    p = ref_p.detach().clone().requires_grad_()
    ref, opt = torch.optim.Adagrad([ref_p], lr=0.3), optim.Adagrad([p], lr=0.3, backend=backend)
    empty = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, 2), (5, 2))
    for _ in range(2):
        ref_p.grad, p.grad = empty.clone(), empty.clone()
        ref.step()
        opt.step()
    assert torch.equal(p.detach(), ref_p.detach())
    assert float(opt.state[p]["step"]) == float(ref.state[ref_p]["step"]) == 2.0


@pytest.mark.parametrize("backend", ["auto"] + SPARSE_BACKENDS)
def test_sparse_gradients_with_weight_decay_raise_torchs_error_before_any_write(backend):
    opt, dense, table = _dense_and_table(optim.Adagrad, backend=backend)
    opt.param_groups[1]["weight_decay"] = 0.1
    dense.grad, table.grad = torch.randn(5), sparse_rows_grad(6, 3, [0])
    before = _snapshot(opt, [dense, table])
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(opt, [dense, table]), before))


def test_adam_with_a_sparse_gradient_raises_torchs_error():
    table = torch.randn(6, 3, requires_grad=True)
    table.grad = sparse_rows_grad(6, 3, [0, 2])
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optim.Adam([table]).step()


def test_tables_that_kernels_cannot_take_go_to_torch_under_auto():
    """A sparse gradient that is not whole rows (sparse_dim 2), or a non-contiguous table: the torch
    backend under auto, a clear error when a kernel backend is named."""
    table = torch.randn(6, 3, requires_grad=True)
    ref_table = table.detach().clone().requires_grad_()
    grad = torch.randn(6, 3).to_sparse()  # sparse_dim 2
    ref, opt = torch.optim.Adagrad([ref_table]), optim.Adagrad([table])
    ref_table.grad, table.grad = grad.clone(), grad.clone()
    ref.step()
    opt.step()
    assert opt.backends_used() == {"torch"}
    torch.testing.assert_close(table.detach(), ref_table.detach())
    for name in SPARSE_BACKENDS:
        if name != "torch":
            with pytest.raises(BackendUnavailableError, match="sparse"):
                table.grad = grad.clone()
                optim.Adagrad([table], backend=name).step()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", ROWWISE_BACKENDS)
def test_rowwise_adagrad_is_fbgemms_exact_rowwise_adagrad(backend):
    """FBGEMM's CPU TBE (``fbgemm-gpu-cpu``, the test extra) with EXACT_ROWWISE_ADAGRAD, its update fused
    into the backward of an EmbeddingBag forward, against EmbeddingBag(sparse=True) and our step on the
    same bags. (Its CPU kernel applies no weight decay, whatever weight_decay_mode says, so none here.)"""
    training = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
    common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")
    rows, dim, lr, eps = 300, 24, 0.1, 1e-8
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(rows, dim, generator=gen)
    tbe = training.SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(rows, dim, common.EmbeddingLocation.HOST, training.ComputeDevice.CPU)],
        optimizer=configs.EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=eps,
        pooling_mode=common.PoolingMode.SUM, weights_precision=configs.SparseType.FP32)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(init)
    bag = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(init)
    opt = optim.RowWiseAdagrad(bag.parameters(), lr=lr, eps=eps, backend=backend)
    for _ in range(4):
        indices = (torch.rand(64, generator=gen) ** 3 * rows).long()  # skewed: many repeats
        offsets = torch.arange(0, 65, 4)
        upstream = torch.randn(16, dim, generator=gen)
        tbe(indices, offsets).backward(upstream)
        opt.zero_grad()
        bag(indices, offsets[:-1]).backward(upstream)
        opt.step()
    torch.testing.assert_close(bag.weight.detach(), tbe.split_embedding_weights()[0])
    torch.testing.assert_close(opt.state[bag.weight]["sum"].flatten(), tbe.split_optimizer_states()[0][0])


def _cuda_table_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    key = BucketKey(torch.device("cuda"), torch.float32, SPARSE)
    return [name for name in ("cuda", "triton") if get_backend(name).available(key.device).ok
            and get_backend(name).supports("adagrad", key, [{}]).ok]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("rows", [1, 1000, 100_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tables_on_cuda_match_torch_and_the_reference(dtype, rows):
    """Every CUDA backend with table kernels: exact sparse Adagrad against torch's sparse step on the GPU,
    row-wise Adagrad (sparse and dense gradients) against the float64 reference, after several steps."""
    backends = _cuda_table_backends()
    if not backends:
        pytest.skip("no CUDA backend with table kernels in this build")
    dim = 129 if rows < 100_000 else 64
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(rows, dim, generator=gen).to(dtype)
    grads = [sparse_rows_grad(rows, dim, _indices(rows, min(4 * rows, 20_000), gen), dtype=dtype, seed=s)
             for s in range(3)]
    for backend in backends:
        ref = init.clone().cuda().requires_grad_()
        p = init.clone().cuda().requires_grad_()
        ref_opt = torch.optim.Adagrad([ref], lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)
        opt = optim.Adagrad([p], lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, backend=backend)
        for g in grads:
            ref.grad, p.grad = g.cuda(), g.cuda()
            ref_opt.step()
            opt.step()
        assert opt.backends_used() == {backend}
        torch.testing.assert_close(p.detach(), ref.detach(), **tolerances(dtype))
        torch.testing.assert_close(opt.state[p]["sum"], ref_opt.state[ref]["sum"], **tolerances(dtype))
        for sparse in (True, False):
            table = init.clone().cuda().requires_grad_()
            rowwise = optim.RowWiseAdagrad([table], lr=0.1, weight_decay=0.01, backend=backend)
            expected, sums, step = init.clone(), torch.zeros(rows, 1, dtype=dtype), torch.tensor(0.0)
            for g in grads:
                g = g if sparse else g.to_dense()
                table.grad = g.cuda()
                rowwise.step()
                rowwise_adagrad_reference(expected, sums, step, g, lr=0.1, lr_decay=0.0, weight_decay=0.01,
                                          eps=1e-10)
            assert rowwise.backends_used() == {backend}
            torch.testing.assert_close(table.detach().cpu(), expected, **tolerances(dtype))
            torch.testing.assert_close(rowwise.state[table]["sum"].cpu(), sums, **tolerances(dtype))


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="this torch assigns no gradient of another dtype")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("family", ["adagrad", "rowwise"])
@pytest.mark.parametrize("backend", ["auto", *SPARSE_BACKENDS])
def test_a_sparse_gradient_of_another_dtype_raises_before_any_write(backend, family):
    dense = torch.randn(4, 3).requires_grad_()
    table = torch.randn(10, 3).requires_grad_()
    table.grad_dtype = None  # what lets a gradient of another dtype through
    cls = optim.Adagrad if family == "adagrad" else optim.RowWiseAdagrad
    opt = cls([{"params": [dense]}, {"params": [table], "lr": 0.5}], backend=backend)
    dense.grad = torch.randn(4, 3)
    table.grad = sparse_rows_grad(10, 3, [1, 2, 2], dtype=torch.float64)
    before = [dense.detach().clone(), table.detach().clone()]
    with pytest.raises(RuntimeError, match="gradient of another dtype"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(table.detach(), before[1])
