"""The CUDA table ops (Note [CUDA table steps] in csrc/cuda/embedding.cuh), without a GPU through their
host emulation (``_emulate_cuda_fused_sparse_adagrad_`` / ``_emulate_cuda_fused_rowwise_adagrad_``: the
same block bodies and op, run block by block on CPU tensors), and on a GPU (``gpu`` marker) against the
CPU ops and the references.

The data and references are those of test_embedding_ops.py: fresh random tables, uncoalesced
gradients with repeated, unsorted rows, two groups, rows never named left bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from recap_kernels import _ext
from tests.reference import FLOAT_DTYPES, dtype_id, sparse_rows_grad, tolerances
from tests.test_embedding_ops import (
    GROUPS,
    ROWWISE_HYPER,
    SPARSE_HYPER,
    TABLES,
    _assert_close,
    _assert_untouched,
    _clone,
    _hyper,
    _rowwise_reference,
    _state,
    _torch_sparse_adagrad,
)

HAS_EMULATION = _ext.has_op("_emulate_cuda_fused_sparse_adagrad_") and _ext.has_op("fused_sparse_adagrad_")
needs_emulation = pytest.mark.skipif(not HAS_EMULATION, reason="recap_kernels._C was built without CUDA kernels")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not HAS_EMULATION, reason="needs a CUDA device")


def _op(name: str):
    return getattr(torch.ops.recap_kernels, name).default


def _emulated(rowwise: bool, state, hyper, *, lr_tensors=None, **kwargs):
    op = _op("_emulate_cuda_fused_rowwise_adagrad_" if rowwise else "_emulate_cuda_fused_sparse_adagrad_")
    op(*state, GROUPS, _hyper(hyper), lr_tensors or [None] * len(GROUPS), **{"maximize": False, **kwargs})


@needs_emulation
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_emulated_sparse_adagrad_is_torchs(dtype, maximize):
    before = _state(dtype, rowwise=False)
    ours = _clone(before)
    for step in range(3):
        expected = _torch_sparse_adagrad(ours, maximize=maximize)
        _emulated(False, ours, SPARSE_HYPER, maximize=maximize)
        _assert_close(ours[0], expected[0], dtype, f"step {step} params")
        _assert_close(ours[2], expected[1], dtype, f"step {step} sums")
        assert [float(s) for s in ours[3]] == [float(s) for s in expected[2]]
    _assert_untouched(ours, before)


@needs_emulation
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_emulated_rowwise_adagrad_is_the_reference(dtype, maximize, sparse):
    before = _state(dtype, rowwise=True, sparse=sparse)
    ours = _clone(before)
    for step in range(3):
        expected = _rowwise_reference(ours, maximize=maximize)
        _emulated(True, ours, ROWWISE_HYPER, maximize=maximize)
        _assert_close(ours[0], expected[0], dtype, f"step {step} params")
        _assert_close(ours[2], expected[1], dtype, f"step {step} sums")
    if sparse:
        _assert_untouched(ours, before)


@needs_emulation
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
def test_emulated_and_cpu_ops_agree_on_float32(rowwise):
    """Sparse Adagrad: the same math in the same order, bit for bit. Row-wise: the row's sum of squares
    is added in another order (128 thread partials vs 16 lanes), so within an ulp or two."""
    hyper = ROWWISE_HYPER if rowwise else SPARSE_HYPER
    cpu, emulated = _state(torch.float32, rowwise=rowwise), None
    emulated = _clone(cpu)
    cpu_op = _op("fused_rowwise_adagrad_" if rowwise else "fused_sparse_adagrad_")
    for _ in range(3):
        cpu_op(*cpu, GROUPS, _hyper(hyper), [None, None], maximize=False)
        _emulated(rowwise, emulated, hyper)
    for a, b in zip(emulated[0] + emulated[2], cpu[0] + cpu[2]):
        if rowwise:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)


@needs_emulation
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
def test_emulated_amp_unscales_in_place_and_found_inf_skips(rowwise):
    hyper = ROWWISE_HYPER if rowwise else SPARSE_HYPER
    scale = torch.tensor(1024.0)
    state = _state(torch.float32, rowwise=rowwise)
    plain = _clone(state)
    scaled = _clone(state)
    scaled[1] = [torch.sparse_coo_tensor(g._indices(), g._values() * 1024, g.shape) for g in scaled[1]]
    _emulated(rowwise, plain, hyper)
    _emulated(rowwise, scaled, hyper, grad_scale=scale, found_inf=torch.tensor(0.0))
    for a, b in zip(scaled[0] + scaled[2], plain[0] + plain[2]):
        torch.testing.assert_close(a, b)
    for g, ref in zip(scaled[1], state[1]):
        torch.testing.assert_close(g._values(), ref._values())  # stored back unscaled
    skipped = _clone(state)
    _emulated(rowwise, skipped, hyper, grad_scale=scale, found_inf=torch.tensor(1.0))
    for a, b in zip(sum(skipped, []), sum(state, [])):
        assert torch.equal(a.to_dense(), b.to_dense())


@needs_emulation
def test_emulated_tensor_lr_and_empty_gradients():
    state = _state(torch.float32, rowwise=False)
    state[1][0] = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, 1), (1, 1))
    before = _clone(state)
    expected = _torch_sparse_adagrad(_clone(state), hyper={**SPARSE_HYPER, "lr": [0.1, 0.25]})
    _emulated(False, state, SPARSE_HYPER, lr_tensors=[None, torch.tensor(0.25, dtype=torch.float64)])
    assert torch.equal(state[0][0], before[0][0]) and float(state[3][0]) == float(before[3][0]) + 1
    _assert_close(state[0], expected[0], torch.float32, "params")


@needs_emulation
def test_emulated_op_refuses_an_index_out_of_range_before_any_write():
    state = _state(torch.float32, rowwise=False)
    rows, dim = TABLES[-1]
    state[1][-1] = sparse_rows_grad(rows, dim, [0, rows], dtype=torch.float32, seed=3)
    before = _clone(state)
    with pytest.raises(IndexError, match="out of range"):
        _emulated(False, state, SPARSE_HYPER)
    for a, b in zip(sum(state, []), sum(before, [])):
        assert torch.equal(a.to_dense(), b.to_dense())


# -- on a GPU ---------------------------------------------------------------------------------------------------------
def _to_cuda(state):
    return [[t.cuda() for t in ts] for ts in state]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["sparse_adagrad", "rowwise"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cuda_table_ops_match_their_emulation(dtype, rowwise, sparse):
    if not rowwise and not sparse:
        pytest.skip("sparse Adagrad takes sparse gradients only")
    hyper = ROWWISE_HYPER if rowwise else SPARSE_HYPER
    name = "fused_rowwise_adagrad_" if rowwise else "fused_sparse_adagrad_"
    host = _state(dtype, rowwise=rowwise, sparse=sparse)
    device = _to_cuda(host)
    lr = torch.tensor(0.05, device="cuda")
    for _ in range(3):
        _emulated(rowwise, host, hyper, lr_tensors=[None, lr.cpu()])
        _op(name)(*device, GROUPS, _hyper(hyper), [None, lr], maximize=False)
    for a, b in zip(device[0] + device[2] + device[3], host[0] + host[2] + host[3]):
        torch.testing.assert_close(a.cpu(), b, **tolerances(dtype))
