"""Many tensors, one launch: the device tables the Triton kernels read.

Data layout (all on the bucket's device):

* ``ptrs``: int64 ``[S, T]``, the address of tensor ``t`` in slot ``s`` (param, grad, states...,
  step). Kernels cast an entry to a typed pointer; there is no limit on ``T``, unlike
  multi-tensor applies that pass addresses as a 4 KB kernel argument and relaunch every few dozen
  tensors.
* ``numel``: int64 ``[T]``; ``tensor_group``: int32 ``[T]``, the row of the tensor's param group
  in the hyperparameter table.
* ``chunk_tensor``: int32 ``[C]`` and ``chunk_start``: int64 ``[C]``: program ``c`` of a launch
  updates elements ``[chunk_start[c], chunk_start[c] + CHUNK_SIZE)`` of tensor ``chunk_tensor[c]``.
* ``hyper``: float64 ``[G, H]``, one row of hyperparameters per param group, and ``lr_addr``:
  int64 ``[2, G]``, the address of the group's learning rate when it is a float32 or float64
  tensor on the device (row 0), and which of the two it is (row 1: 0 for the table's own value,
  32 or 64), so a scheduler that updates a Tensor lr in place costs nothing and a CUDA graph
  replays with the new value.

Everything but the gradient addresses and the hyperparameters is built once per parameter set
and cached until some address or size changes; gradients (new tensors after
``zero_grad(set_to_none=True)``) and hyperparameters are compared with the cached copies each step
and uploaded only when they differ.
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

GRAD_SLOT = 1  # slot 0 is the parameter, slot 1 its gradient, then the states, then the step


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
# table, which restore_value cannot protect. These are measured on scratch copies instead (see
# bench/README.md); architectures not listed use the default.
_DEFAULT_CONFIG = LaunchConfig(block_size=1024, chunk_size=16384, num_warps=4)
_CONFIGS: dict[tuple[int, int], LaunchConfig] = {}
# The interpreter runs a program as numpy operations: fewer, larger programs are faster there.
_INTERPRETER_CONFIG = LaunchConfig(block_size=8192, chunk_size=8192, num_warps=1)


def launch_config(device: torch.device) -> LaunchConfig:
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    return _CONFIGS.get(torch.cuda.get_device_capability(device), _DEFAULT_CONFIG)


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


def _addresses(tensors: list[Tensor]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


def _upload(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list to the device without waiting for the device (pinned staging on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        # From pageable memory the copy would first wait for the stream; the caching host
        # allocator keeps the pinned buffer alive until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class TensorTable:
    """The device tables for one bucket of tensors (see the module docstring)."""

    def __init__(self, slots: list[list[Tensor]], group_sizes: list[int], config: LaunchConfig, device):
        self.device = device
        self.config = config
        self.num_tensors = len(slots[0])
        self.num_groups = len(group_sizes)
        self.grad_addresses = _addresses(slots[GRAD_SLOT])
        self.ptrs = torch.tensor([_addresses(s) for s in slots], dtype=torch.int64).to(device)
        numel = torch.tensor([t.numel() for t in slots[0]], dtype=torch.int64)
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

    @staticmethod
    def static_key_of(slots: list[list[Tensor]], group_sizes: list[int]) -> tuple:
        """Everything the cached tables depend on, except the gradients."""
        key = [tuple(group_sizes), tuple(t.numel() for t in slots[0])]
        key.extend(_addresses(s) for i, s in enumerate(slots) if i != GRAD_SLOT)
        return tuple(key)

    def refresh_grads(self, grads: list[Tensor]) -> None:
        addresses = _addresses(grads)
        if addresses != self.grad_addresses:
            self.ptrs[GRAD_SLOT].copy_(_upload(addresses, torch.int64, self.device))
            self.grad_addresses = addresses

    def refresh_hyper(self, rows: list[tuple[float, ...]], lrs: list[Any]) -> None:
        """Upload per-group hyperparameters when they changed; ``lrs`` are the groups' ``lr`` values.

        A float32/float64 Tensor lr on the bucket's device is read by the kernel through its
        address; a CPU Tensor lr on a CUDA bucket is read on the host (no device sync); any other
        Tensor lr is copied to the device as float32 every step.
        """
        addrs, kinds, values, keep = [], [], [], []
        for lr in lrs:
            if torch.is_tensor(lr) and (lr.device.type != "cpu" or self.device.type == "cpu"):
                if lr.dtype not in (torch.float32, torch.float64) or lr.device != self.device:
                    lr = lr.to(device=self.device, dtype=torch.float32)
                keep.append(lr)
                addrs.append(lr.data_ptr())
                kinds.append(64 if lr.dtype == torch.float64 else 32)
                values.append(0.0)
            else:
                addrs.append(0)
                kinds.append(0)
                values.append(float(lr))
        key = (tuple(rows), tuple(values), tuple(addrs), tuple(kinds))
        self._keep_alive = keep
        if key == self._hyper_key:
            return
        self.hyper = _upload([(v, *row) for v, row in zip(values, rows)], torch.float64, self.device)
        self.lr_addr = _upload([addrs, kinds], torch.int64, self.device)
        self._hyper_key = key


_TABLES_PER_BUCKET = 4


def table_for(cache: dict, name: str, slots: list[list[Tensor]], group_sizes: list[int], device,
              limit: int | None = None) -> TensorTable:
    """The :class:`TensorTable` for these tensors, from ``cache`` when it has one.

    A few tables are kept per bucket (``limit``, least recently used first out), so a parameter
    whose gradient is ``None`` every other step switches between two cached tables instead of
    rebuilding one.
    """
    tables = cache.setdefault(name, OrderedDict())
    key = TensorTable.static_key_of(slots, group_sizes)
    table = tables.get(key)
    if table is None:
        table = TensorTable(slots, group_sizes, launch_config(device), device)
        tables[key] = table
        if len(tables) > (limit or _TABLES_PER_BUCKET):
            tables.popitem(last=False)
    else:
        tables.move_to_end(key)
        table.refresh_grads(slots[GRAD_SLOT])
    return table
