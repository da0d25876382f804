"""Fused multi-tensor Adam/AdamW in Triton: one launch updates every tensor of a bucket.

Pointer table rows (``multi_tensor``): PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ (amsgrad
only), then the step counters. Hyperparameter row per group: ``lr, beta1, beta2, eps, weight_decay``.

Each program reads its tensor's ``step`` from the device, computes the bias corrections as torch's
fused kernel of the device does (``ORDER``, see Note [Operation orders] in ``_math``) and updates
one chunk; a second, tiny launch then advances every step counter, since programs of the same
tensor must all read the old count. A step with ``found_inf`` set changes nothing, counters
included: the whole path needs no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

from recap_kernels._triton import multi_tensor
from recap_kernels._triton._math import _adam_math, _adam_scalars, _load_lr, _to_storage, _unscale
from recap_kernels._triton.multi_tensor import (
    EXP_AVG,
    EXP_AVG_SQ,
    GRAD,
    MAX_EXP_AVG_SQ,
    PARAM,
    TensorTable,
    _program_chunk,
    _slot_ptr,
)

ROW = tl.constexpr(5)  # hyperparameters per group row: lr, beta1, beta2, eps, weight_decay


@triton.jit
def _adam_kernel(
    ptrs, numel_ptr, tensor_group_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, lr_addr_ptr,
    grad_scale_ptr, found_inf_ptr, num_tensors, num_groups,
    DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, ORDER: tl.constexpr,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    t, chunk_start, numel, group = _program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, tensor_group_ptr)
    p_ptr = _slot_ptr(ptrs, PARAM, t, num_tensors, DTYPE)
    g_ptr = _slot_ptr(ptrs, GRAD, t, num_tensors, DTYPE)
    m_ptr = _slot_ptr(ptrs, EXP_AVG, t, num_tensors, DTYPE)
    v_ptr = _slot_ptr(ptrs, EXP_AVG_SQ, t, num_tensors, DTYPE)
    if AMSGRAD:
        v_max_ptr = _slot_ptr(ptrs, MAX_EXP_AVG_SQ, t, num_tensors, DTYPE)
        step_ptr = _slot_ptr(ptrs, MAX_EXP_AVG_SQ + 1, t, num_tensors, tl.float32)
    else:
        v_max_ptr = v_ptr  # unused
        step_ptr = _slot_ptr(ptrs, EXP_AVG_SQ + 1, t, num_tensors, tl.float32)

    # Per-tensor scalars, from torch's double hyperparameters, rounded as torch's fused kernel of ORDER rounds them.
    row = hyper_ptr + group * ROW
    lr = _load_lr(tl.load(row), lr_addr_ptr, group, num_groups)
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay = (
        _adam_scalars(lr, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), step,
                      MATH_DTYPE, ORDER)
    )
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)

    for block in range(0, CHUNK_SIZE, BLOCK_SIZE):
        offs = chunk_start + block + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        mask = offs < numel
        p = tl.load(p_ptr + offs, mask=mask).to(MATH_DTYPE)
        g = tl.load(g_ptr + offs, mask=mask).to(MATH_DTYPE)
        m = tl.load(m_ptr + offs, mask=mask).to(MATH_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask).to(MATH_DTYPE)
        if AMSGRAD:
            v_max = tl.load(v_max_ptr + offs, mask=mask).to(MATH_DTYPE)
        else:
            v_max = v
        if HAS_GRAD_SCALE:
            g = _unscale(g, grad_scale, ORDER)
            tl.store(g_ptr + offs, _to_storage(g, DTYPE), mask=mask)  # torch's fused path stores unscaled grads
        p, m, v, v_max = _adam_math(
            p, g, m, v, v_max,
            step_size, bias_correction2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
            decay, AMSGRAD, DECOUPLED, MAXIMIZE, ORDER,
        )
        tl.store(p_ptr + offs, _to_storage(p, DTYPE), mask=mask)
        tl.store(m_ptr + offs, _to_storage(m, DTYPE), mask=mask)
        tl.store(v_ptr + offs, _to_storage(v, DTYPE), mask=mask)
        if AMSGRAD:
            tl.store(v_max_ptr + offs, _to_storage(v_max, DTYPE), mask=mask)


def adam_launch(table: TensorTable, *, dtype, math_dtype, amsgrad: bool, decoupled: bool, maximize: bool,
                grad_scale=None, found_inf=None) -> None:
    """Update every tensor of ``table`` in one launch, then advance their step counters."""
    cfg = table.config
    if table.num_chunks:
        _adam_kernel[(table.num_chunks,)](
            table.ptrs, table.numel, table.tensor_group, table.chunk_tensor, table.chunk_start,
            table.hyper, table.lr_addr, grad_scale, found_inf, table.num_tensors, table.num_groups,
            DTYPE=dtype, MATH_DTYPE=math_dtype, ORDER=multi_tensor.torch_cuda_order(table.device),
            AMSGRAD=amsgrad, DECOUPLED=decoupled, MAXIMIZE=maximize,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            CHUNK_SIZE=cfg.chunk_size, BLOCK_SIZE=cfg.block_size, num_warps=cfg.num_warps,
            enable_fp_fusion=False,  # only the FMAs _math spells out (Note [Operation orders])
        )
    multi_tensor.increment_steps(table, found_inf)
