"""Embedding tables in Triton: exact sparse Adagrad and row-wise Adagrad (Note [Table steps] in
recap_kernels/backends/_base.py), called by the ``triton`` backend with a run's lists.

``sparse_adagrad_step`` is torch.optim.Adagrad's sparse branch: per row present in a sparse COO gradient
(duplicates summed), ``sum += g * g``, ``w -= clr * g / (sqrt(sum) + eps)``. ``rowwise_adagrad_step`` is
FBGEMM's EXACT_ROWWISE_ADAGRAD (``recap_kernels.optim.RowWiseAdagrad``): one accumulator per row,
``sum += mean(g * g)``, with L2 weight decay, for sparse or dense gradients. Math in float32 (float64 for
float64 tables), rounded once per store; rows without a gradient are not touched.

Note [Sparse rows without coalescing]
A sparse gradient arrives uncoalesced (duplicate rows, in any order). ``coalesce()`` would cost a sort,
a reduction and new tensors, and a dense scratch of the table's size would cost what the table costs;
instead the row indices are sorted (``torch.sort``, stable, keeping the permutation: O(nnz)) and the
kernel runs one program per sorted position. A program whose row differs from the previous position's
is a segment head: it finds the end of its run of equal rows and sums their value rows (both ``DUP``
positions at a time past the first, so that a hot row's loads overlap), then updates that row; the other
programs return at once. The grid is known from nnz, so no host sync is needed, and each value row is
read (and, under AMP, written back unscaled) by exactly one program. A gradient already coalesced skips
the sort. The cost: a hot row's entries are still summed by one program; a row named 10^5 times in one
gradient would want its run split across programs (not done: unmeasured).

Note [Table launches]
One launch per table (sparse: one program per gradient entry; dense row-wise: one per block of rows),
then one ``_foreach_add_`` for every step counter: tables are few and large, so a pointer table across
them (as ``multi_tensor`` builds for many small tensors) would save little, and each table gets the
block shape that fits its row width. Programs loop over a row in blocks of ``BLOCK_D`` columns; row-wise
rows wider than one block take two passes (the mean of squares, then the update), summing a sparse
row's duplicates in each. The hyperparameter rows go up in one copy when they change (the last few are
kept per device); a Tensor lr, ``step``, ``grad_scale`` and ``found_inf`` are read on the device.

torch has no fused kernel for either step, so there is one operation order on every device: torch's
sparse branch (``sum + g * g`` and the update rounded twice; ``clr``, ``eps``, ``weight_decay`` rounded to
the math dtype once), IEEE division and square root, launched with ``enable_fp_fusion=False`` (Note
[Operation orders] in ``_math``).

The only host sync of a call is the check that every sparse row index is in its table (one read for all
tables), so that a call that raises has written nothing; with dense gradients there is none.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from recap_kernels._triton import multi_tensor
from recap_kernels._triton._math import CPU_ORDER, _adagrad_clr, _div_rn, _sqrt_rn, _to_storage, _unscale

ROW = tl.constexpr(4)  # hyperparameters per group row: lr, lr_decay, eps, weight_decay

# Storage dtype -> (Triton storage dtype, Triton math dtype): fp32 math for every storage but fp64.
_TL_DTYPES = {
    torch.float32: (tl.float32, tl.float32),
    torch.bfloat16: (tl.bfloat16, tl.float32),
    torch.float16: (tl.float16, tl.float32),
    torch.float64: (tl.float64, tl.float64),
}

# Columns per vector operation at most, and elements per program of the dense row-wise kernel. The
# interpreter runs a program as numpy operations: fewer, larger programs are faster there.
MAX_BLOCK_D = 1024
_ELEMENTS_PER_PROGRAM = 2048
_INTERPRETER_MAX_BLOCK_D = 8192
_INTERPRETER_ELEMENTS_PER_PROGRAM = 8192
DUP = 8  # duplicate value rows a segment head reads at once


@triton.jit
def _clr_eps_decay(hyper_ptr, group, lr_ptr, step_ptr, MATH_DTYPE: tl.constexpr, HAS_LR_TENSOR: tl.constexpr):
    """The group's ``clr`` (for the step being taken: the counter advances after the launch), ``eps`` and
    ``weight_decay``, computed in fp64 and rounded to the math dtype once, as torch's sparse branch does."""
    row = hyper_ptr + group * ROW
    lr = tl.load(row)
    if HAS_LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    clr = _adagrad_clr(lr, tl.load(row + 1), tl.load(step_ptr), CPU_ORDER)
    return clr.to(MATH_DTYPE), tl.load(row + 2).to(MATH_DTYPE), tl.load(row + 3).to(MATH_DTYPE)


@triton.jit
def _load_unscaled(v_ptr, mask, grad_scale, DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, STORE_UNSCALED: tl.constexpr):
    """Gradient elements at ``v_ptr`` (sparse values or a dense gradient; zeros where masked) in the math
    dtype, unscaled with GradScaler's scale (and stored back unscaled when ``STORE_UNSCALED``: torch's fused
    path stores unscaled gradients)."""
    v = tl.load(v_ptr, mask=mask, other=0).to(MATH_DTYPE)
    if HAS_GRAD_SCALE:
        v = _unscale(v, grad_scale, CPU_ORDER)
        if STORE_UNSCALED:
            tl.store(v_ptr, _to_storage(v, DTYPE), mask=mask)
    return v


@triton.jit
def _value_row(values_ptr, perm_ptr, j, cols, mask, value_row_stride, value_col_stride, grad_scale,
               DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, PERMUTED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
               STORE_UNSCALED: tl.constexpr):
    """Columns ``cols`` of the value row of sorted position ``j``, as :func:`_load_unscaled` loads them."""
    entry = tl.cast(j, tl.int64)
    if PERMUTED:
        entry = tl.load(perm_ptr + j)
    v_ptr = values_ptr + entry * value_row_stride + cols * value_col_stride
    return _load_unscaled(v_ptr, mask, grad_scale, DTYPE, MATH_DTYPE, HAS_GRAD_SCALE, STORE_UNSCALED)


@triton.jit
def _value_rows(values_ptr, perm_ptr, js, end, cols, mask, value_row_stride, value_col_stride, grad_scale,
                DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, PERMUTED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                STORE_UNSCALED: tl.constexpr):
    """:func:`_value_row` for the sorted positions ``js`` before ``end`` at once: ``[len(js), len(cols)]``
    (zeros past ``end``)."""
    in_segment = js < end
    entries = tl.cast(js, tl.int64)
    if PERMUTED:
        entries = tl.load(perm_ptr + js, mask=in_segment, other=0)
    v_ptr = values_ptr + entries[:, None] * value_row_stride + (cols * value_col_stride)[None, :]
    return _load_unscaled(v_ptr, in_segment[:, None] & mask[None, :], grad_scale, DTYPE, MATH_DTYPE, HAS_GRAD_SCALE,
                          STORE_UNSCALED)


@triton.jit
def _segment_grad(values_ptr, perm_ptr, start, end, cols, mask, value_row_stride, value_col_stride, grad_scale,
                  DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, PERMUTED: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, STORE_UNSCALED: tl.constexpr, DUP: tl.constexpr):
    """Columns ``cols`` of one row's gradient: the value rows of sorted positions ``[start, end)`` summed.

    The first one alone (a row named once, the common case, costs one row; a lone -0.0 stays -0.0, as
    coalesce leaves it), then the duplicates ``DUP`` rows at a time: a hot row's loads overlap.
    """
    g = _value_row(values_ptr, perm_ptr, start, cols, mask, value_row_stride, value_col_stride, grad_scale, DTYPE,
                   MATH_DTYPE, PERMUTED, HAS_GRAD_SCALE, STORE_UNSCALED)
    for j in range(start + 1, end, DUP):
        g += tl.sum(_value_rows(values_ptr, perm_ptr, j + tl.arange(0, DUP), end, cols, mask, value_row_stride,
                                value_col_stride, grad_scale, DTYPE, MATH_DTYPE, PERMUTED, HAS_GRAD_SCALE,
                                STORE_UNSCALED), 0)
    return g


@triton.jit
def _rowwise_grad(g, w, weight_decay, MAXIMIZE: tl.constexpr):
    """The row-wise update's gradient: negated with maximize, then L2 weight decay."""
    if MAXIMIZE:
        g = -g
    if weight_decay != 0:  # skipped, not multiplied by zero: inf/nan weights behave as in the reference
        g = g + weight_decay * w
    return g


@triton.jit
def _sparse_kernel(
    p_ptr, sum_ptr, values_ptr, sorted_ptr, perm_ptr, step_ptr, hyper_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    nnz, dim, value_row_stride, value_col_stride, group,
    DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, ROWWISE: tl.constexpr, MAXIMIZE: tl.constexpr,
    PERMUTED: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr, DUP: tl.constexpr,
):
    """One sparse gradient entry per program; segment heads update their row (Note [Sparse rows without
    coalescing]). Exact Adagrad (``sum_ptr`` the table's shape) or row-wise (``sum_ptr`` one per row)."""
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    start = tl.program_id(0)
    row = tl.load(sorted_ptr + start)
    if tl.load(sorted_ptr + start - 1, mask=start > 0, other=-1) == row:
        return  # not a segment head (row indices are >= 0)
    end = start + 1  # past the segment: the sorted positions after it, DUP at a time
    more = True
    while more:
        ahead = end + tl.arange(0, DUP)
        same = tl.sum((tl.load(sorted_ptr + ahead, mask=ahead < nnz, other=-1) == row).to(tl.int32), 0)
        end += same  # sorted: the positions equal to row are the first ones
        more = same == DUP

    clr, eps, weight_decay = _clr_eps_decay(hyper_ptr, group, lr_ptr, step_ptr, MATH_DTYPE, HAS_LR_TENSOR)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    p_row = p_ptr + row * dim
    offs = tl.arange(0, BLOCK_D)

    if not ROWWISE:
        s_row = sum_ptr + row * dim
        for c in range(0, dim, BLOCK_D):
            cols = c + offs
            mask = cols < dim
            g = _segment_grad(values_ptr, perm_ptr, start, end, cols, mask, value_row_stride, value_col_stride,
                              grad_scale, DTYPE, MATH_DTYPE, PERMUTED, HAS_GRAD_SCALE, True, DUP)
            if MAXIMIZE:
                g = -g
            acc = tl.load(s_row + cols, mask=mask).to(MATH_DTYPE) + g * g
            p = tl.load(p_row + cols, mask=mask).to(MATH_DTYPE)
            p = p - clr * _div_rn(g, _sqrt_rn(acc) + eps)  # torch: param.add_(g / std, alpha=-clr)
            tl.store(s_row + cols, _to_storage(acc, DTYPE), mask=mask)
            tl.store(p_row + cols, _to_storage(p, DTYPE), mask=mask)
    elif ONE_BLOCK:
        mask = offs < dim
        g = _segment_grad(values_ptr, perm_ptr, start, end, offs, mask, value_row_stride, value_col_stride,
                          grad_scale, DTYPE, MATH_DTYPE, PERMUTED, HAS_GRAD_SCALE, True, DUP)
        w = tl.load(p_row + offs, mask=mask, other=0).to(MATH_DTYPE)
        g = _rowwise_grad(g, w, weight_decay, MAXIMIZE)
        acc = tl.load(sum_ptr + row).to(MATH_DTYPE) + _div_rn(tl.sum(g * g, 0), tl.cast(dim, MATH_DTYPE))
        w = w - _div_rn(clr * g, _sqrt_rn(acc) + eps)
        tl.store(sum_ptr + row, _to_storage(acc, DTYPE))
        tl.store(p_row + offs, _to_storage(w, DTYPE), mask=mask)
    else:
        squares = tl.zeros([BLOCK_D], MATH_DTYPE)
        for c in range(0, dim, BLOCK_D):
            cols = c + offs
            mask = cols < dim
            g = _segment_grad(values_ptr, perm_ptr, start, end, cols, mask, value_row_stride, value_col_stride,
                              grad_scale, DTYPE, MATH_DTYPE, PERMUTED, HAS_GRAD_SCALE, False, DUP)
            w = tl.load(p_row + cols, mask=mask, other=0).to(MATH_DTYPE)
            g = _rowwise_grad(g, w, weight_decay, MAXIMIZE)
            squares += g * g
        acc = tl.load(sum_ptr + row).to(MATH_DTYPE) + _div_rn(tl.sum(squares, 0), tl.cast(dim, MATH_DTYPE))
        denom = _sqrt_rn(acc) + eps
        for c in range(0, dim, BLOCK_D):
            cols = c + offs
            mask = cols < dim
            g = _segment_grad(values_ptr, perm_ptr, start, end, cols, mask, value_row_stride, value_col_stride,
                              grad_scale, DTYPE, MATH_DTYPE, PERMUTED, HAS_GRAD_SCALE, True, DUP)
            w = tl.load(p_row + cols, mask=mask, other=0).to(MATH_DTYPE)
            g = _rowwise_grad(g, w, weight_decay, MAXIMIZE)
            w = w - _div_rn(clr * g, denom)
            tl.store(p_row + cols, _to_storage(w, DTYPE), mask=mask)
        tl.store(sum_ptr + row, _to_storage(acc, DTYPE))


@triton.jit
def _dense_rowwise_kernel(
    p_ptr, sum_ptr, g_ptr, step_ptr, hyper_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, num_rows, dim, group,
    DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """Row-wise Adagrad with a dense gradient: ``BLOCK_R`` rows per program, every row updated."""
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    clr, eps, weight_decay = _clr_eps_decay(hyper_ptr, group, lr_ptr, step_ptr, MATH_DTYPE, HAS_LR_TENSOR)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    offs = tl.arange(0, BLOCK_D)
    if ONE_BLOCK:
        mask = row_mask[:, None] & (offs < dim)[None, :]
        elems = rows[:, None] * dim + offs[None, :]
        g = _load_unscaled(g_ptr + elems, mask, grad_scale, DTYPE, MATH_DTYPE, HAS_GRAD_SCALE, True)
        w = tl.load(p_ptr + elems, mask=mask, other=0).to(MATH_DTYPE)
        g = _rowwise_grad(g, w, weight_decay, MAXIMIZE)
        acc = tl.load(sum_ptr + rows, mask=row_mask).to(MATH_DTYPE) + _div_rn(tl.sum(g * g, 1),
                                                                              tl.cast(dim, MATH_DTYPE))
        w = w - _div_rn(clr * g, (_sqrt_rn(acc) + eps)[:, None])
        tl.store(p_ptr + elems, _to_storage(w, DTYPE), mask=mask)
    else:
        squares = tl.zeros([BLOCK_R, BLOCK_D], MATH_DTYPE)
        for c in range(0, dim, BLOCK_D):  # first pass: the mean of squares
            cols = c + offs
            mask = row_mask[:, None] & (cols < dim)[None, :]
            elems = rows[:, None] * dim + cols[None, :]
            g = _load_unscaled(g_ptr + elems, mask, grad_scale, DTYPE, MATH_DTYPE, HAS_GRAD_SCALE, False)
            w = tl.load(p_ptr + elems, mask=mask, other=0).to(MATH_DTYPE)
            g = _rowwise_grad(g, w, weight_decay, MAXIMIZE)
            squares += g * g
        acc = tl.load(sum_ptr + rows, mask=row_mask).to(MATH_DTYPE) + _div_rn(tl.sum(squares, 1),
                                                                              tl.cast(dim, MATH_DTYPE))
        denom = (_sqrt_rn(acc) + eps)[:, None]
        for c in range(0, dim, BLOCK_D):  # second pass: the update
            cols = c + offs
            mask = row_mask[:, None] & (cols < dim)[None, :]
            elems = rows[:, None] * dim + cols[None, :]
            g = _load_unscaled(g_ptr + elems, mask, grad_scale, DTYPE, MATH_DTYPE, HAS_GRAD_SCALE, True)
            w = tl.load(p_ptr + elems, mask=mask, other=0).to(MATH_DTYPE)
            g = _rowwise_grad(g, w, weight_decay, MAXIMIZE)
            tl.store(p_ptr + elems, _to_storage(w - _div_rn(clr * g, denom), DTYPE), mask=mask)
    tl.store(sum_ptr + rows, _to_storage(acc, DTYPE), mask=row_mask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
def sparse_adagrad_step(params, grads, sums, steps, group_sizes, hyper, lr_tensors, *, maximize: bool,
                        grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """torch.optim.Adagrad's sparse step for these tables, in place: ``grads`` sparse COO gradients of whole
    rows (possibly uncoalesced), ``sums`` of the tables' shapes, ``steps`` 0-d float32 counters (advanced
    by one unless ``found_inf`` is nonzero). ``hyper``: ``lr, lr_decay, eps, weight_decay`` per group of
    ``group_sizes``, weight decay 0; ``lr_tensors``: per group ``None`` or a 1-element Tensor lr."""
    _step(params, grads, sums, steps, group_sizes, hyper, lr_tensors, maximize, grad_scale, found_inf, rowwise=False)


def rowwise_adagrad_step(params, grads, sums, steps, group_sizes, hyper, lr_tensors, *, maximize: bool,
                         grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) for these tables, in place: ``grads`` sparse COO
    gradients of whole rows or dense ones of the tables' shapes, ``sums`` ``(rows, 1)``; otherwise as
    :func:`sparse_adagrad_step`, weight decay included."""
    _step(params, grads, sums, steps, group_sizes, hyper, lr_tensors, maximize, grad_scale, found_inf, rowwise=True)


def _step(params, grads, sums, steps, group_sizes, hyper, lr_tensors, maximize, grad_scale, found_inf, *,
          rowwise: bool) -> None:
    groups = _check(params, grads, sums, steps, group_sizes, hyper, lr_tensors, grad_scale, found_inf, rowwise)
    if not params:
        return
    device = params[0].device
    interpreted = device.type != "cuda"
    hyper_rows = _hyper_rows(hyper, device)
    for p, g, s, step, group in zip(params, grads, sums, steps, groups):
        if p.numel() == 0 or (g.is_sparse and g._nnz() == 0):
            continue  # nothing to update (a table with empty rows has no mean to take: left as it is)
        dtype, math_dtype = _TL_DTYPES[p.dtype]
        lr = lr_tensors[group]
        rows, dim = p.shape
        common = dict(DTYPE=dtype, MATH_DTYPE=math_dtype, MAXIMIZE=maximize, HAS_LR_TENSOR=lr is not None,
                      HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                      enable_fp_fusion=False)  # only the roundings torch makes (Note [Operation orders] in _math)
        if g.is_sparse:
            block_d = min(triton.next_power_of_2(dim), _INTERPRETER_MAX_BLOCK_D if interpreted else MAX_BLOCK_D)
            indices, values = g._indices()[0], g._values()
            if g.is_coalesced():
                ordered, perm = indices, None
            else:
                ordered, perm = torch.sort(indices, stable=True)
            _sparse_kernel[(g._nnz(),)](
                p, s, values, ordered, perm, step, hyper_rows, lr, grad_scale, found_inf,
                g._nnz(), dim, values.stride(0), values.stride(1), group,
                ROWWISE=rowwise, PERMUTED=perm is not None, BLOCK_D=block_d, ONE_BLOCK=dim <= block_d, DUP=DUP,
                num_warps=1 if interpreted else _num_warps(block_d * DUP // 4), **common,
            )
        else:
            block_d = min(triton.next_power_of_2(dim), _INTERPRETER_MAX_BLOCK_D if interpreted else MAX_BLOCK_D)
            per_program = _INTERPRETER_ELEMENTS_PER_PROGRAM if interpreted else _ELEMENTS_PER_PROGRAM
            block_r = min(max(1, per_program // block_d), triton.next_power_of_2(rows))
            _dense_rowwise_kernel[(triton.cdiv(rows, block_r),)](
                p, s, g, step, hyper_rows, lr, grad_scale, found_inf, rows, dim, group,
                BLOCK_R=block_r, BLOCK_D=block_d, ONE_BLOCK=dim <= block_d,
                num_warps=1 if interpreted else _num_warps(block_r * block_d), **common,
            )
    # The counters advance after every launch has read them (Note [Table launches]).
    torch._foreach_add_(steps, 1.0 if found_inf is None else 1.0 - found_inf.reshape(()))


_HYPER_ROWS: OrderedDict = OrderedDict()  # (device, hyper) -> its rows on the device, least recently used first
_HYPER_ROWS_KEPT = 16


def _hyper_rows(hyper, device: torch.device) -> Tensor:
    """The float64 hyperparameter rows on ``device``: uploaded (one copy, no wait) when not among the last few."""
    key = (device, tuple(map(float, hyper)))
    rows = _HYPER_ROWS.get(key)
    if rows is None:
        rows = _HYPER_ROWS[key] = multi_tensor._upload(torch.tensor(key[1], dtype=torch.float64), device)
        if len(_HYPER_ROWS) > _HYPER_ROWS_KEPT:
            _HYPER_ROWS.popitem(last=False)
    _HYPER_ROWS.move_to_end(key)
    return rows


def _num_warps(elements: int) -> int:
    """About four elements per thread, 1 to 8 warps."""
    return max(1, min(8, elements // 128))


def _check(params, grads, sums, steps, group_sizes, hyper, lr_tensors, grad_scale, found_inf, rowwise) -> list[int]:
    """Everything the kernels assume, checked before any launch (a call that raises writes nothing).
    Returns each table's group index."""
    what = "rowwise_adagrad_step" if rowwise else "sparse_adagrad_step"
    n = len(params)
    if not len(grads) == len(sums) == len(steps) == n:
        raise ValueError(f"{what}: params, grads, sums and steps must be as long as each other, not {n}, "
                         f"{len(grads)}, {len(sums)} and {len(steps)}")
    if any(size < 0 for size in group_sizes) or sum(group_sizes) != n:
        raise ValueError(f"{what}: group_sizes {list(group_sizes)} do not split {n} tables")
    if len(hyper) != ROW.value * len(group_sizes) or len(lr_tensors) != len(group_sizes):
        raise ValueError(f"{what}: hyper needs {ROW.value} values and lr_tensors one entry per group "
                         f"({len(group_sizes)} groups), not {len(hyper)} and {len(lr_tensors)}")
    groups = [k for k, size in enumerate(group_sizes) for _ in range(size)]
    if not rowwise:
        for k in range(len(group_sizes)):
            if hyper[ROW.value * k + 3] != 0:
                raise ValueError(f"{what}: weight_decay option is not compatible with sparse gradients")
    if not n:
        return groups
    device = params[0].device
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.device != device or t.numel() != 1 or not t.is_floating_point()):
            raise ValueError(f"{what}: {name} must be a 1-element floating tensor on {device}")
    for k, lr in enumerate(lr_tensors):
        if lr is not None and (not isinstance(lr, Tensor) or lr.device != device or lr.numel() != 1
                               or not lr.is_floating_point()):
            raise ValueError(f"{what}: the Tensor lr of group {k} must be a 1-element floating tensor on {device}")
    ranges = []  # (table, rows, indices) of the sparse gradients to check
    for i, (p, g, s, step) in enumerate(zip(params, grads, sums, steps)):
        if p.dtype not in _TL_DTYPES:
            raise TypeError(f"{what}: tables are float32/float64/bfloat16/float16, not {p.dtype} (param {i})")
        if p.device != device or p.dim() != 2 or not p.is_contiguous():
            raise ValueError(f"{what}: param {i} must be a contiguous 2-D table on {device}, not "
                             f"{tuple(p.shape)} on {p.device}")
        sum_shape = (p.shape[0], 1) if rowwise else tuple(p.shape)
        if s.dtype != p.dtype or s.device != device or tuple(s.shape) != sum_shape or not s.is_contiguous():
            raise ValueError(f"{what}: sum {i} must be a contiguous {p.dtype} tensor of shape {sum_shape} on "
                             f"{device}, not {s.dtype} {tuple(s.shape)} on {s.device}")
        if step.dtype != torch.float32 or step.device != device or step.dim() != 0:
            raise ValueError(f"{what}: step {i} must be a 0-d float32 tensor on {device}")
        if g.dtype != p.dtype or g.device != device or g.shape != p.shape:
            raise ValueError(f"{what}: grad {i} must be a {p.dtype} tensor of shape {tuple(p.shape)} on {device}, "
                             f"not {g.dtype} {tuple(g.shape)} on {g.device}")
        if g.layout == torch.sparse_coo:
            if g.sparse_dim() != 1 or g.dense_dim() != 1:
                raise ValueError(f"{what}: grad {i} must be a sparse gradient of whole rows (sparse_dim 1, "
                                 f"dense_dim 1), not sparse_dim {g.sparse_dim()}")
            if g._nnz():
                ranges.append((i, p.shape[0], g._indices()[0]))
        elif not rowwise or g.layout != torch.strided or not g.is_contiguous():
            raise ValueError(f"{what}: grad {i} must be a sparse COO gradient"
                             f"{' or a contiguous dense one' if rowwise else ''}, not {g.layout}")
    if ranges:  # one host read for every table
        bounds = torch.stack([torch.stack(torch.aminmax(indices)) for _, _, indices in ranges]).tolist()
        for (i, rows, _), (low, high) in zip(ranges, bounds):
            if low < 0 or high >= rows:
                raise IndexError(f"{what}: the sparse gradient of a table of {rows} rows (param {i}) has row "
                                 f"indices from {low} to {high}: out of range")
    return groups
