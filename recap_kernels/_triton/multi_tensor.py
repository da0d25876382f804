"""Many tensors, one launch: the device tables the Triton kernels read.

Data layout (all on the bucket's device):

* ``ptrs``: int64 ``[S + 1, T]``, the address of tensor ``t`` in slot ``s`` (:data:`PARAM`,
  :data:`GRAD`, the states, in torch's fused kernels' order), then the step counters in the last
  row. Kernels cast an entry to a typed pointer; there is no limit on ``T``, unlike multi-tensor
  applies that pass addresses as a 4 KB kernel argument and relaunch every few dozen tensors.
* ``numel``: int64 ``[T]``; ``tensor_group``: int32 ``[T]``, the row of the tensor's param group
  in the hyperparameter table.
* ``chunk_tensor``: int32 ``[C]`` and ``chunk_start``: int64 ``[C]``: program ``c`` of a launch
  updates elements ``[chunk_start[c], chunk_start[c] + CHUNK_SIZE)`` of tensor ``chunk_tensor[c]``.
* ``hyper``: float64 ``[G, F]``, one row of hyperparameters per param group (Note [Group
  hyperparameters] in csrc/common/records.h), and ``lr_addr``: int64 ``[2, G]``, the address of
  the group's learning rate when it is a Tensor on the device (row 0), and which dtype it is (row
  1: 0 for the row's own value, 32 or 64), so a scheduler that updates a Tensor lr in place costs
  nothing and a CUDA graph replays with the new value.

A table is built once per plan from a BoundBucket's ``addresses()`` (Note [Bound buckets] in
csrc/common/bucket.h); at each step only the gradients' addresses (when they moved) and the
hyperparameters (when they changed) are uploaded, each with one copy.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from recap_kernels._torch_numerics import torch_cuda_adam_opmath, torch_cuda_fused_adagrad
from recap_kernels._triton._math import CPU_ORDER, CUDA_DOUBLE_ORDER, CUDA_OPMATH_ORDER

# Rows of ``ptrs``, named as torch's fused kernels name them (kParamIdx, kGradIdx, ...); the step
# counters follow the last state row.
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
EXP_AVG = tl.constexpr(2)
EXP_AVG_SQ = tl.constexpr(3)
MAX_EXP_AVG_SQ = tl.constexpr(4)
STATE_SUM = tl.constexpr(2)


@triton.jit
def _program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, tensor_group_ptr):
    """This program's work: ``(tensor index, first element, tensor numel, param group index)``."""
    t = tl.load(chunk_tensor_ptr + tl.program_id(0))
    return t, tl.load(chunk_start_ptr + tl.program_id(0)), tl.load(numel_ptr + t), tl.load(tensor_group_ptr + t)


@triton.jit
def _slot_ptr(ptrs, slot, t, num_tensors, DTYPE: tl.constexpr):
    """Tensor ``t``'s data in pointer-table slot ``slot``, as a typed pointer."""
    return tl.load(ptrs + slot * num_tensors + t).to(tl.pointer_type(DTYPE))


@dataclass(frozen=True)
class LaunchConfig:
    """Work per program and its shape; frozen per GPU architecture from bench/ measurements."""

    block_size: int  # elements per vector operation
    chunk_size: int  # elements per program (a multiple of block_size)
    num_warps: int


# Why not @triton.autotune: its tuning runs would update the parameters through the pointer
# table, which restore_value cannot protect. bench/tune_triton.py measures shapes on scratch copies
# instead; no GPU run has been recorded yet, so every architecture uses this default until one is
# (freeze the winner per compute capability here, citing the run).
_DEFAULT_CONFIG = LaunchConfig(block_size=1024, chunk_size=16384, num_warps=4)
# The interpreter runs a program as numpy operations: fewer, larger programs are faster there.
_INTERPRETER_CONFIG = LaunchConfig(block_size=8192, chunk_size=8192, num_warps=1)


def launch_config(device: torch.device) -> LaunchConfig:
    return _DEFAULT_CONFIG if device.type == "cuda" else _INTERPRETER_CONFIG


def torch_cuda_order(device: torch.device) -> int:
    """The operation order of the Adam kernel on ``device``: that of torch's fused Adam there.

    ``CPU_ORDER`` off CUDA; on CUDA, the order of the installed torch's fused CUDA Adam, which
    changed in torch 2.11. Low-precision results then match torch's fused path of the same device
    to one ulp (Note [Operation orders] in _math.py).
    """
    if device.type != "cuda":
        return CPU_ORDER.value
    return CUDA_OPMATH_ORDER.value if _torch_cuda_adam_opmath() else CUDA_DOUBLE_ORDER.value


@functools.cache
def _torch_cuda_adam_opmath() -> bool:
    return torch_cuda_adam_opmath()  # reads a header of torch's: once per process


def torch_cuda_adagrad_order(device: torch.device) -> int:
    """The operation order of the Adagrad kernel on ``device``: that of torch's fused Adagrad there.

    ``CUDA_DOUBLE_ORDER`` on CUDA when the installed torch has a fused CUDA Adagrad (torch >= 2.12),
    whose arithmetic it is; ``CPU_ORDER`` elsewhere, and on CUDA with an older torch, whose only fused
    Adagrad is the CPU kernel (Note [Operation orders] in _math.py).
    """
    if device.type == "cuda" and _torch_cuda_fused_adagrad():
        return CUDA_DOUBLE_ORDER.value
    return CPU_ORDER.value


@functools.cache
def _torch_cuda_fused_adagrad() -> bool:
    return torch_cuda_fused_adagrad()  # reads a header of torch's: once per process


def addresses_of(slots: list[list[Tensor]]) -> Tensor:
    """The ``ptrs`` table (on the host) of these lists: one row per slot, the step counters last."""
    return torch.tensor([[t.data_ptr() for t in slot] for slot in slots], dtype=torch.int64)


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor to the device without waiting for the device (pinned staging on CUDA)."""
    if device.type == "cuda":
        # From pageable memory the copy would first wait for the stream; the caching host
        # allocator keeps the pinned buffer alive until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device, copy=True)


class TensorTable:
    """The device tables for one run of a bucket (see the module docstring)."""

    def __init__(self, addresses: Tensor, numels: list[int], group_sizes: list[int], config: LaunchConfig,
                 device: torch.device):
        self.device = device
        self.config = config
        self.num_tensors = len(numels)
        self.num_groups = len(group_sizes)
        self.step_row = addresses.shape[0] - 1
        self.ptrs = _upload(addresses, device)
        numel = torch.tensor(numels, dtype=torch.int64)
        self.numel = numel.to(device)
        self.tensor_group = torch.repeat_interleave(
            torch.arange(len(group_sizes), dtype=torch.int32), torch.tensor(group_sizes, dtype=torch.int64)
        ).to(device)
        chunks_per_tensor = (numel + config.chunk_size - 1) // config.chunk_size
        self.num_chunks = int(chunks_per_tensor.sum())
        chunk_tensor = torch.repeat_interleave(torch.arange(self.num_tensors, dtype=torch.int32), chunks_per_tensor)
        first_chunk = torch.cumsum(chunks_per_tensor, 0) - chunks_per_tensor
        chunk_index = torch.arange(self.num_chunks, dtype=torch.int64) - first_chunk[chunk_tensor.long()]
        self.chunk_tensor = chunk_tensor.to(device)
        self.chunk_start = (chunk_index * config.chunk_size).to(device)
        self.hyper: Tensor | None = None
        self.lr_addr: Tensor | None = None
        self._hyper_key: Any = None
        self._keep_alive: list[Tensor] = []
        self._grads: Tensor | None = None  # host copy of the gradient row of ``ptrs``

    def update_grads(self, grad_addresses: Tensor) -> None:
        """The gradients' addresses (int64 ``[T]`` on the host), uploaded in one copy when they differ
        from the ones the device table holds (after ``zero_grad(set_to_none=True)`` the caching
        allocator usually hands the new gradients the old addresses)."""
        if self._grads is not None and torch.equal(grad_addresses, self._grads):
            return
        self.ptrs[GRAD.value].copy_(_upload(grad_addresses, self.device))
        self._grads = grad_addresses.clone()

    def set_hyper(self, hyper: list[float], lr_tensors: list[Tensor | None]) -> None:
        """This step's per-group rows and Tensor lrs (:func:`recap_kernels.backends._base.hyper_rows`),
        uploaded when they differ from the last step's.

        A Tensor lr (on this table's device: ``hyper_rows`` read any other on the host) is read by the
        kernel through its address: float32/float64 in place, another dtype converted to float64 first.
        """
        addrs, kinds, keep = [], [], []
        for lr in lr_tensors:
            if lr is None:
                addrs.append(0)
                kinds.append(0)
                continue
            if lr.dtype not in (torch.float32, torch.float64):
                lr = lr.to(torch.float64)
            keep.append(lr)
            addrs.append(lr.data_ptr())
            kinds.append(64 if lr.dtype == torch.float64 else 32)
        self._keep_alive = keep
        key = (tuple(hyper), tuple(addrs), tuple(kinds))
        if key == self._hyper_key:
            return
        self.hyper = _upload(torch.tensor(hyper, dtype=torch.float64).view(self.num_groups, -1), self.device)
        self.lr_addr = _upload(torch.tensor([addrs, kinds], dtype=torch.int64), self.device)
        self._hyper_key = key


@triton.jit
def _increment_steps_kernel(step_addrs_ptr, num_tensors, found_inf_ptr, HAS_FOUND_INF: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr):
    """``step += 1`` for every tensor of the bucket (``+= 1 - found_inf`` under AMP)."""
    i = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = i < num_tensors
    steps = tl.load(step_addrs_ptr + i, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    increment = 1.0
    if HAS_FOUND_INF:
        increment = 1.0 - tl.load(found_inf_ptr)
    tl.store(steps, tl.load(steps, mask=mask) + increment, mask=mask)


def increment_steps(table: TensorTable, found_inf) -> None:
    """Advance every step counter of ``table`` (after the update launch: its programs read the old count)."""
    block = 256
    grid = (triton.cdiv(table.num_tensors, block),)
    _increment_steps_kernel[grid](
        table.ptrs[table.step_row], table.num_tensors, found_inf, HAS_FOUND_INF=found_inf is not None,
        BLOCK_SIZE=block,
    )


_TABLES_PER_CACHE = 64


def table_for(cache: OrderedDict, slots: list[list[Tensor]], group_sizes: list[int],
              device: torch.device) -> TensorTable:
    """The :class:`TensorTable` of these lists (traced steps: the lists arrive anew at each call).

    Tables are cached by every address but the gradients' (least recently used first out); a hit
    re-uploads the gradients' addresses when they moved.
    """
    addresses = addresses_of(slots)
    params = slots[PARAM.value]
    key = (tuple(group_sizes), tuple(t.numel() for t in params),
           tuple(addresses[[r for r in range(addresses.shape[0]) if r != GRAD.value]].flatten().tolist()))
    table = cache.get(key)
    if table is None:
        table = cache[key] = TensorTable(addresses, [t.numel() for t in params], group_sizes, launch_config(device),
                                         device)
        if len(cache) > _TABLES_PER_CACHE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    table.update_grads(addresses[GRAD.value])
    return table
