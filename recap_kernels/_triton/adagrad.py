"""Fused multi-tensor Adagrad in Triton: one launch updates every tensor of a bucket.

Pointer table rows (``multi_tensor``): PARAM, GRAD, STATE_SUM, then the step counters.
Hyperparameter row per group: ``lr, lr_decay, eps, weight_decay``. Step counters and AMP as in ``adam``.

The arithmetic is that of torch's fused Adagrad of the device (``ORDER``, picked by
``multi_tensor.torch_cuda_adagrad_order``): on CUDA, torch's fused CUDA Adagrad (torch >= 2.12) where
the installed torch has one, else torch's fused CPU Adagrad, the only fused Adagrad of older torch;
off CUDA, the CPU one (see ``_math._adagrad_math`` and Note [Operation orders] in ``_math``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from recap_kernels._triton import multi_tensor
from recap_kernels._triton._math import CPU_ORDER, _adagrad_clr, _adagrad_math, _load_lr, _to_storage, _unscale
from recap_kernels._triton.multi_tensor import GRAD, PARAM, STATE_SUM, TensorTable, _program_chunk, _slot_ptr

ROW = tl.constexpr(4)  # hyperparameters per group row: lr, lr_decay, eps, weight_decay


@triton.jit
def _adagrad_kernel(
    ptrs, numel_ptr, tensor_group_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, lr_addr_ptr,
    grad_scale_ptr, found_inf_ptr, num_tensors, num_groups,
    DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ORDER: tl.constexpr = CPU_ORDER,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    t, chunk_start, numel, group = _program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, tensor_group_ptr)
    p_ptr = _slot_ptr(ptrs, PARAM, t, num_tensors, DTYPE)
    g_ptr = _slot_ptr(ptrs, GRAD, t, num_tensors, DTYPE)
    acc_ptr = _slot_ptr(ptrs, STATE_SUM, t, num_tensors, DTYPE)
    step_ptr = _slot_ptr(ptrs, STATE_SUM + 1, t, num_tensors, tl.float32)

    row = hyper_ptr + group * ROW
    lr = _load_lr(tl.load(row), lr_addr_ptr, group, num_groups)
    lr_decay = tl.load(row + 1)
    eps = tl.load(row + 2)
    weight_decay = tl.load(row + 3)
    clr = _adagrad_clr(lr, lr_decay, tl.load(step_ptr), ORDER)  # the counter advances after this launch
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)

    for block in range(0, CHUNK_SIZE, BLOCK_SIZE):
        offs = chunk_start + block + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        mask = offs < numel
        p = tl.load(p_ptr + offs, mask=mask).to(MATH_DTYPE)
        g = tl.load(g_ptr + offs, mask=mask).to(MATH_DTYPE)
        acc = tl.load(acc_ptr + offs, mask=mask).to(MATH_DTYPE)
        if HAS_GRAD_SCALE:
            # In every order: torch's CUDA kernel divides in fp64 and rounds to fp32, the same number
            # (Note [CUDA Adagrad order] in adagrad_math.h).
            g = _unscale(g, grad_scale, CPU_ORDER)
            tl.store(g_ptr + offs, _to_storage(g, DTYPE), mask=mask)  # torch's fused path stores unscaled grads
        p, acc = _adagrad_math(p, g, acc, clr, eps, weight_decay, MAXIMIZE, ORDER)
        tl.store(p_ptr + offs, _to_storage(p, DTYPE), mask=mask)
        tl.store(acc_ptr + offs, _to_storage(acc, DTYPE), mask=mask)


def adagrad_launch(table: TensorTable, *, dtype, math_dtype, maximize: bool, grad_scale=None, found_inf=None) -> None:
    """Update every tensor of ``table`` in one launch, then advance their step counters."""
    cfg = table.config
    if table.num_chunks:
        _adagrad_kernel[(table.num_chunks,)](
            table.ptrs, table.numel, table.tensor_group, table.chunk_tensor, table.chunk_start,
            table.hyper, table.lr_addr, grad_scale, found_inf, table.num_tensors, table.num_groups,
            DTYPE=dtype, MATH_DTYPE=math_dtype, MAXIMIZE=maximize,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            CHUNK_SIZE=cfg.chunk_size, BLOCK_SIZE=cfg.block_size, num_warps=cfg.num_warps,
            ORDER=multi_tensor.torch_cuda_adagrad_order(table.device),
            enable_fp_fusion=False,  # only the FMAs _math spells out (Note [Operation orders])
        )
    multi_tensor.increment_steps(table, found_inf)
