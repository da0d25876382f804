"""Benchmark cases: one contender on one workload, built and checked, ready to be timed.

The pytest-benchmark suite (``bench/test_*.py``, ``make bench``) times these; the workloads, the
contenders and the checks are those of ``python -m recap_kernels bench`` (:mod:`.buckets`,
:mod:`.run`, :mod:`.embedding`), not copies. A case is checked before it is timed: it takes
:data:`CHECK_STEPS` steps from the workload's start and must end where its reference ends
(``torch.optim``'s single-tensor path for the kernel workloads, the ``torch`` backend for the recap
model, torch's sparse Adagrad and the ``torch`` backend's row-wise Adagrad for the table). A case
whose ``check`` is not ``"OK"`` must not be timed. Then ``step()`` is one step, called as many
times as the timer likes (the state keeps evolving, as in training).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recap_kernels.bench import buckets, embedding, run, workloads

CHECK_STEPS = 3


@dataclass
class Case:
    suite: str  # "kernels" | "recap" | "embedding"
    workload: str
    optimizer: str
    contender: str
    device: torch.device
    step: Callable[[], None]
    check: str
    bytes: int = 0  # what one step must move (the roofline's numerator); 0 where no roofline applies
    n_params: int = 0
    n_tensors: int = 0
    dtype: str = "float32"
    notes: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """The case's fields for a result row (pytest-benchmark's ``extra_info``)."""
        return {"suite": self.suite, "workload": self.workload, "optimizer": self.optimizer,
                "contender": self.contender, "device": self.device.type, "dtype": self.dtype, "bytes": self.bytes,
                "n_params": self.n_params, "n_tensors": self.n_tensors, "check": self.check, **self.notes}


# -- kernels: one optimizer over a fixed parameter set ---------------------------------------------------------------
def kernel_workload(name: str, device: torch.device, scale: float = 1.0) -> buckets.BucketWorkload:
    return {w.name: w for w in buckets.workloads(device, scale)}[name]


def kernel_contenders(device: torch.device) -> list[str]:
    """torch's single-tensor, foreach and fused paths, then every kernel backend available here, eager and
    under ``torch.compile`` (``recap-<backend>-compiled``)."""
    return list(buckets.contenders("adam", device, compiled=True))


def _kernel_run(workload: buckets.BucketWorkload, optimizer: str, contender: str, device: torch.device):
    """The contender's parameters and step after :data:`CHECK_STEPS` steps; a compiled contender's first
    step compiles (its time is in the notes: ``compile_s``)."""
    params, grads = buckets.workload_tensors(workload, device)
    for p, g in zip(params, grads):
        p.grad = g
    backend = contender.removeprefix("recap-").removesuffix("-compiled")
    make = buckets.contenders(optimizer, device, backends=[backend] if contender.startswith("recap-") else [],
                              compiled=True)[contender]
    opt = make(buckets.param_groups(params, workload.groups))
    step, notes, taken = opt.step, {}, 0
    if contender.endswith("-compiled"):
        step, notes["compile_s"] = buckets.compile_step(opt, device)
        taken = 1  # the compiling step is one of the checked steps
    for _ in range(CHECK_STEPS - taken):
        step()
    return params, step, notes


@functools.lru_cache(maxsize=4)
def _kernel_reference(workload: buckets.BucketWorkload, optimizer: str, device: torch.device) -> list[torch.Tensor]:
    params, _, _ = _kernel_run(workload, optimizer, "torch-single", device)
    return params


def kernel_case(workload: buckets.BucketWorkload, optimizer: str, contender: str, device: torch.device) -> Case:
    params, step, notes = _kernel_run(workload, optimizer, contender, device)
    check = "OK" if contender == "torch-single" else buckets.check_against(
        params, _kernel_reference(workload, optimizer, device))
    return Case("kernels", workload.name, optimizer, contender, device, step, check,
                bytes=buckets.BYTES_PER_PARAM[optimizer] * workload.numel, n_params=workload.numel,
                n_tensors=len(workload.sizes), notes=notes)


# -- recap: the recap model's optimizer step, and its whole training step --------------------------------------------
def recap_contenders(device: torch.device) -> list[str]:
    return run.select_contenders(None, device)


def recap_case(workload: workloads.Workload, contender: str, device: torch.device, *, training: bool) -> Case:
    """``training=False``: ``optimizer.step()`` alone on fixed gradients; ``True``: forward + backward +
    step + scheduler step + zero_grad. Checked first by :func:`run.run` in lockstep with the reference."""
    names = list(dict.fromkeys([run.REFERENCE, contender]))
    report = run.run(workload, device, names, steps=CHECK_STEPS, warmup=0)
    result = report.results[-1]
    check = "OK" if not result.problems else "MISMATCH: " + "; ".join(result.problems)[:300]
    model = workloads.build_model(workload, device)
    optimizer, scheduler = run.CONTENDERS[contender].build(model, *workloads.load_optimizer_configs())
    batches = workloads.make_batches(workload, device)
    model(batches[0]).backward()
    traffic = run.Traffic.of(optimizer)
    counter = iter(range(1 << 62))

    def train_step() -> None:
        optimizer.zero_grad()
        model(batches[next(counter) % len(batches)]).backward()
        optimizer.step()
        scheduler.step()

    def optimizer_step() -> None:  # a closure: the scheduler's wrapped step keeps only a weakref to the optimizer
        optimizer.step()

    return Case("recap", workload.name + (" train" if training else ""), "adam+adagrad", contender, device,
                train_step if training else optimizer_step, check,
                bytes=0 if training else traffic.bytes, n_params=traffic.params, n_tensors=traffic.tensors,
                dtype=traffic.dtype, notes={"backends_used": sorted(result.backends_used)})


# -- embedding: one table, sparse gradients --------------------------------------------------------------------------
def embedding_contenders(device: torch.device) -> list[tuple[str, str]]:
    return embedding.contenders(device)


def _embedding_run(contender: str, scale: float, touched: int, device: torch.device):
    init = embedding.initial_table(device, scale)
    batches = embedding.make_batches(*init.shape, touched, device)
    table, step_batch = embedding.contender_stepper(init, contender, batches)
    counter = iter(range(1 << 62))

    def step() -> None:
        step_batch(next(counter))

    for _ in range(CHECK_STEPS):
        step()
    return table, step, table.grad


@functools.lru_cache(maxsize=2)
def _embedding_reference(family: str, scale: float, touched: int, device: torch.device) -> torch.Tensor:
    table, _, _ = _embedding_run(embedding.REFERENCES[family], scale, touched, device)
    return table.detach().clone()


def embedding_case(family: str, contender: str, touched: int, device: torch.device, scale: float = 1.0) -> Case:
    table, step, grad = _embedding_run(contender, scale, touched, device)  # grad: the last batch stepped
    check = "OK" if contender == embedding.REFERENCES[family] else embedding._check(
        table.detach(), _embedding_reference(family, scale, touched, device))
    rows, dim = table.shape
    sparse = grad.coalesce() if grad.is_sparse else None
    unique = sparse._nnz() if sparse is not None else rows
    nnz = grad._nnz() if sparse is not None else rows
    sum_width = 1 if family == "rowwise" else dim
    # touched rows' weights and accumulators read and written, every gradient row and index read
    moved = 4 * (2 * unique * dim + 2 * unique * sum_width + nnz * dim) + (8 * nnz if sparse is not None else 0)
    return Case("embedding", f"{rows}x{dim} touched {touched}", family, contender, device, step, check,
                bytes=moved, n_params=unique * dim, n_tensors=1)
