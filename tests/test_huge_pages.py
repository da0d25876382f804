"""Huge pages for CPU tables stepped with sparse gradients (Note [Table huge pages] in
recap_kernels/backends/_huge_pages.py): which tensors are advised, that Linux then backs them with
2 MiB pages, that the advice changes no number, and that it can be turned off."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from recap_kernels import optim
from recap_kernels.backends import _huge_pages as huge_pages
from tests.reference import sparse_rows_grad

ROWS, DIM = 65_536, 64  # 16 MiB of fp32: above MIN_BYTES


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


needs_thp = pytest.mark.skipif(not (sys.platform.startswith("linux") and _thp_available()),
                               reason="needs Linux with transparent huge pages")


def _huge_bytes(t: torch.Tensor) -> int:
    """AnonHugePages of the mappings that overlap ``t``'s memory (/proc/self/smaps)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                overlaps = lo < end and start < hi
            elif overlaps and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


def _table_and_opt(cls, backend="cpu"):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(ROWS, DIM))
    opt = cls([table], lr=0.1, initial_accumulator_value=0.1, backend=backend)
    return table, opt


def _sparse_grad(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    indices = torch.randint(0, ROWS, (300,), generator=gen).tolist()
    return sparse_rows_grad(ROWS, DIM, indices, dtype=torch.float32, seed=step)


@needs_thp
@pytest.mark.parametrize("cls", [optim.Adagrad, optim.RowWiseAdagrad])
def test_a_cpu_table_with_sparse_gradients_steps_in_huge_pages_with_the_same_numbers(cls, monkeypatch):
    table, opt = _table_and_opt(cls)
    on_4k, opt_4k = _table_and_opt(cls)
    for step in range(3):
        table.grad = _sparse_grad(step)
        on_4k.grad = table.grad.clone()
        monkeypatch.delenv("RECAP_KERNELS_HUGE_PAGES", raising=False)
        opt.step()
        monkeypatch.setenv("RECAP_KERNELS_HUGE_PAGES", "0")
        opt_4k.step()
    assert opt.backends_used() == opt_4k.backends_used() == {"cpu"}
    assert _huge_bytes(table) >= huge_pages.HUGE_PAGE
    state_sum = opt.state[table]["sum"]
    if state_sum.numel() * state_sum.element_size() >= huge_pages.MIN_BYTES:  # Adagrad's; row-wise's is 256 KiB
        assert _huge_bytes(state_sum) >= huge_pages.HUGE_PAGE
    # The advice moves pages, not values: bit for bit what the step computes on 4 KiB pages (which
    # tests/test_embedding_tables.py compares with torch).
    torch.testing.assert_close(table, on_4k, rtol=0, atol=0)
    torch.testing.assert_close(state_sum, opt_4k.state[on_4k]["sum"], rtol=0, atol=0)


@needs_thp
def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RECAP_KERNELS_HUGE_PAGES", "0")
    table, opt = _table_and_opt(optim.Adagrad)
    before = _huge_bytes(table)
    table.grad = _sparse_grad(0)
    opt.step()
    assert _huge_bytes(table) == before


def test_only_large_private_cpu_tensors_are_advised(monkeypatch):
    monkeypatch.delenv("RECAP_KERNELS_HUGE_PAGES", raising=False)
    large = torch.empty(huge_pages.MIN_BYTES // 4 + 1024)
    span = huge_pages._huge_range(large)
    assert span is not None
    start, length = span
    # whole huge pages, inside the tensor's own memory
    assert start % huge_pages.HUGE_PAGE == 0 and length % huge_pages.HUGE_PAGE == 0 and length > 0
    assert large.data_ptr() <= start and start + length <= large.data_ptr() + large.numel() * 4
    assert huge_pages._huge_range(torch.empty(huge_pages.MIN_BYTES // 4 - 1)) is None
    assert huge_pages._huge_range(large[::2]) is None  # not contiguous
    assert huge_pages._huge_range(large.clone().share_memory_()) is None  # another process may map it
    monkeypatch.setenv("RECAP_KERNELS_HUGE_PAGES", "0")
    assert huge_pages._huge_range(large) is None


@needs_thp
def test_a_tensor_is_collapsed_once_per_memory(monkeypatch):
    monkeypatch.delenv("RECAP_KERNELS_HUGE_PAGES", raising=False)
    t = torch.nn.Parameter(torch.randn(ROWS, DIM))
    assert huge_pages.collapse(t)
    assert not huge_pages.collapse(t)  # a plan rebuilt for the same table: no second walk
    t.data = torch.randn(ROWS, DIM)  # new memory under the same parameter
    assert huge_pages.collapse(t)
