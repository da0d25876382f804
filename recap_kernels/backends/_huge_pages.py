"""Transparent huge pages for large CPU embedding tables and their state.

Note [Table huge pages]
A sparse table step on the CPU touches a few thousand to a few hundred thousand rows scattered over a
table far larger than the caches: each row is a few cache lines of the table and of its ``sum``. On
4 KiB pages each of those rows is also a TLB miss (a 2M x 64 fp32 table spans 131,072 pages; the L2
TLB of the bench's EPYC holds 3,072), and the page walks, not the bytes, bound the step. On 2 MiB pages
the same table spans 256, and the step approaches the memory bandwidth: on the bench machine (2M x 64,
fp32, a table on each kind of page stepping in turn) 3.1 ms instead of 3.8 ms at 64k indices, 0.82 ms
instead of 1.06 ms at 16k (bench/README.md).

So when the kernel backends first plan a CPU table step with sparse gradients, they ask Linux to put
the table and its ``sum`` in huge pages: ``MADV_HUGEPAGE`` (future faults) and ``MADV_COLLAPSE`` (Linux
6.1+: the pages already there are copied into huge pages, synchronously), once per tensor. That costs
about 2.4 ms per MiB on the bench machine (2.4 s for the 512 MiB table and its 512 MiB ``sum``), once,
in the first step. (Adagrad's ``sum`` exists before any step, as torch makes it at construction, and a
loaded state dict's is new memory, so collapsing is the one path for both.)
Only whole 2 MiB pages inside the tensor's own memory are advised, never memory around it; tensors under
:data:`MIN_BYTES`, in shared memory (``share_memory_()``, another process may map them) or on another
device are left alone. It is advice: the values do not change, a kernel without THP (or with
``transparent_hugepage`` set to ``never``) declines and the step runs on 4 KiB pages, as it would have.
``RECAP_KERNELS_HUGE_PAGES=0`` in the environment turns it off (read at each plan).
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from functools import cache

import torch
from torch import Tensor

MIN_BYTES = 8 << 20  # beyond the L1 TLB's reach and a large share of the L2's on 4 KiB pages
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25

# The tensors collapsed so far, by id: (a weak reference, the range). A collapse of memory already in huge
# pages still walks it (0.1 s for 512 MiB), so a plan rebuilt for the same tensor does not ask again; the
# same tensor with other memory (``p.data = ...``), or another tensor at a freed one's address, does.
_collapsed: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}


def enabled() -> bool:
    return os.environ.get("RECAP_KERNELS_HUGE_PAGES", "1") != "0"


@cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _huge_range(t: Tensor) -> tuple[int, int] | None:
    """The whole huge pages inside ``t``'s memory, as (address, bytes), or None when ``t`` is not a CPU
    tensor to advise (Note [Table huge pages])."""
    if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous() or t.is_shared():
        return None
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES or not enabled():
        return None
    start = (t.data_ptr() + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (t.data_ptr() + nbytes) & ~(HUGE_PAGE - 1)
    return (start, end - start) if end > start else None


def collapse(t: Tensor) -> bool:
    """``MADV_HUGEPAGE`` and ``MADV_COLLAPSE`` on a tensor already in memory, once per tensor and memory.
    Returns whether the kernel collapsed it now."""
    span = _huge_range(t)
    madvise = _madvise()
    if span is None or madvise is None:
        return False
    seen = _collapsed.get(id(t))
    if seen is not None and seen[0]() is t and seen[1] == span:
        return False
    _collapsed[id(t)] = (weakref.ref(t, lambda _, key=id(t): _collapsed.pop(key, None)), span)
    if madvise(span[0], span[1], _MADV_HUGEPAGE) != 0:
        return False
    return madvise(span[0], span[1], _MADV_COLLAPSE) == 0
