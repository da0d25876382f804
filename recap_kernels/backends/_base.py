"""What every backend provides, and what the optimizers hand to it.

A backend is an object with a ``name``, an ``available(device)`` check, a ``supports(kind, key,
groups)`` check, and the three calls of a step (:class:`Backend`). The optimizer classes know nothing
else about kernels: they group tensors into :class:`Bucket` s, ask the registry which backend runs
each bucket, and call it.

Every backend reads a bucket's per-group hyperparameters in one format, :func:`hyper_rows` (Note
[Group hyperparameters] in ``csrc/common/records.h``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from recap_kernels.backends import _huge_pages as huge_pages


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what can."""


class Availability(NamedTuple):
    """``(ok, reason)``: ``reason`` is empty when ``ok`` and says why not otherwise."""

    ok: bool
    reason: str = ""


OK = Availability(True, "")


# Memory layouts of a bucket's tensors, as the plan sees them.
CONTIGUOUS = "contiguous"  # parameter, gradient and state contiguous and apart: every kernel takes these
STRIDED = "strided"  # a non-contiguous parameter, gradient or state tensor: the torch backend's job
SPARSE = "sparse"  # a sparse COO gradient of whole rows (sparse_dim 1) of a contiguous table: the table kernels
SPARSE_OTHER = "other-sparse"  # any other sparse COO gradient, or a non-contiguous table: the torch backend's job
OVERLAPPING = "overlapping"  # contiguous, but some tensors share memory: updated in order, by torch
SHARDED = "sharded"  # DTensors whose local shards a kernel can step (Note [Sharded parameters])
DTENSOR = "dtensor"  # any other DTensor parameter: torch's DTensor-aware paths, the torch backend


class BucketKey(NamedTuple):
    """Tensors that can share one launch: same device, same dtype, same memory layout."""

    device: torch.device
    dtype: torch.dtype
    layout: str

    @property
    def sparse(self) -> bool:
        return self.layout in (SPARSE, SPARSE_OTHER)

    def __str__(self) -> str:
        return f"{self.layout} {str(self.dtype).removeprefix('torch.')} tensors on {self.device}"


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def kernel_supports(kernels: str, key: BucketKey, groups) -> Availability:
    """What every kernel backend takes: contiguous dense float tensors apart in memory, without autograd.

    ``kernels`` names them in the reason (e.g. "the Triton kernels").
    """
    if key.layout == DTENSOR:
        return Availability(False, f"{kernels} step the local shards of DTensors whose gradient and state share "
                                   f"the parameter's mesh and placements and are contiguous, which these are not")
    if key.layout == OVERLAPPING:
        return Availability(False, f"{kernels} update tensors in parallel, and some of these parameters or "
                                   f"their states share memory: they are updated one after another, in order")
    if key.layout not in (CONTIGUOUS, SHARDED):
        return Availability(False, f"{kernels} take contiguous dense tensors, not {key.layout} ones")
    return _kernel_dtype_and_autograd(kernels, key, groups)


def _kernel_dtype_and_autograd(kernels: str, key: BucketKey, groups) -> Availability:
    if key.dtype not in KERNEL_DTYPES:
        return Availability(False, f"{kernels} take float32/bfloat16/float16/float64, not {key.dtype}")
    if any(group.get("differentiable") for group in groups):
        return Availability(False, "differentiable=True needs autograd through the update: the torch backend")
    return OK


def is_table_step(kind: str, key: BucketKey) -> bool:
    """Whether a kernel backend runs this bucket with its table ops (Note [Table steps]) rather than the
    multi-tensor kernels: sparse gradients of Adagrad, and row-wise Adagrad with either kind of gradient."""
    return kind == "rowwise_adagrad" or (kind == "adagrad" and key.layout == SPARSE)


def table_supports(kernels: str, kind: str, key: BucketKey, groups, has_table_ops: Availability) -> Availability:
    """:func:`kernel_supports` for table steps: contiguous tables with dense or whole-row sparse gradients."""
    if not has_table_ops.ok:
        return has_table_ops
    if key.layout not in (CONTIGUOUS, SPARSE, SHARDED):
        what = "row-wise Adagrad" if kind == "rowwise_adagrad" else "sparse Adagrad"
        return Availability(False, f"{kernels} run {what} on contiguous tables with dense gradients or sparse "
                                   f"gradients of whole rows (sparse_dim 1), not {key.layout} ones")
    return _kernel_dtype_and_autograd(kernels, key, groups)


# ------------------------------------------------------------------------------------------------
# Per-group hyperparameters (Note [Group hyperparameters] in csrc/common/records.h)
# ------------------------------------------------------------------------------------------------
ADAM_FIELDS = ("lr", "beta1", "beta2", "eps", "weight_decay")
ADAGRAD_FIELDS = ("lr", "lr_decay", "eps", "weight_decay")


def lr_operand(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """A group's lr as the kernels take it: ``(value, None)`` or ``(0.0, tensor read by the kernel)``.

    The one Tensor-lr policy of every backend: a Tensor lr has one element; on the parameters' device
    it is read where the kernel runs (no host sync: CUDA graphs, schedulers updating it in place); on
    the CPU for parameters elsewhere it is read on the host, which needs no device sync; anywhere else
    it is an error. Raised here, before any bucket of the step is written.
    """
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr.is_floating_point():
        raise TypeError(f"a Tensor lr must be floating point, not {lr.dtype}")
    if lr.device == device:
        return 0.0, lr
    if lr.device.type == "cpu":
        return float(lr), None
    raise ValueError(f"a Tensor lr on {lr.device} cannot drive parameters on {device}: keep it on their "
                     f"device or on the CPU")


def hyper_rows(kind: str, groups: list[dict[str, Any]], device: torch.device) -> tuple[list[float], list]:
    """``(hyper, lr_tensors)`` for these groups: one row of ``ADAM_FIELDS`` / ``ADAGRAD_FIELDS`` per group.

    Read from the groups at every step (schedulers change them between steps).
    """
    rows: list[float] = []
    lr_tensors: list[Tensor | None] = []
    for group in groups:
        lr, lr_tensor = lr_operand(group["lr"], device)
        lr_tensors.append(lr_tensor)
        if kind != "adam":  # Adagrad, sparse or row-wise
            rows += (lr, float(group["lr_decay"]), float(group["eps"]), float(group["weight_decay"]))
        else:
            beta1, beta2 = group["betas"]
            rows += (lr, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))
    return rows, lr_tensors


def state_names(kind: str, amsgrad: bool = False) -> tuple[str, ...]:
    """The state tensors a kernel reads, in its slot order (after the parameter and the gradient)."""
    if kind != "adam":
        return ("sum",)
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Consecutive groups of a bucket that one kernel call updates: they agree on its compile-time
    switches (amsgrad, AdamW's decoupled decay, maximize). Usually one run covers a bucket.

    ``bound`` and ``table`` are what the backend keeps for this run while the plan lives (its
    BoundBucket, Triton's device tables); ``hyper`` is this step's :func:`hyper_rows`.
    """

    switches: tuple
    groups: list[dict[str, Any]]
    sizes: list[int]
    part: slice
    bound: Any = None
    table: Any = None
    hyper: tuple = ()


@dataclass
class Bucket:
    """The tensors of one optimizer that step together, across param groups.

    Tensors are ordered group by group, so each group owns one contiguous span
    ``spans[i] = (start, stop)`` of every per-tensor list; ``groups[i]`` is that param group's
    dict (lr, betas, weight decay, flags) exactly as the optimizer holds it.
    ``state`` maps torch's state key names (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    ``sum``) to per-tensor lists, aligned with ``params`` (``None`` where a tensor's group has no
    such state, e.g. ``max_exp_avg_sq`` without amsgrad); ``steps`` are the ``state["step"]`` tensors.
    ``runs`` split it by the backend's compile-time switches. ``grads`` are this step's gradients
    where a backend reads them in Python (the torch backend, traced steps); ``planned`` is what a
    backend recorded when the plan was built, to check at each gather. ``sources`` are the DTensor
    parameters of a SHARDED bucket whose ``params`` are their local shards (Note [Sharded parameters]).
    """

    key: BucketKey
    groups: list[dict[str, Any]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    state: dict[str, list[Tensor]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    planned: Any = None
    sources: list[Tensor] = field(default_factory=list)
    alone: bool = False  # the plan's only bucket (Note [Table steps])

    def __len__(self) -> int:
        return len(self.params)

    def split_runs(self, switches) -> list[Run]:
        """One :class:`Run` per stretch of consecutive groups on which ``switches(group)`` agrees."""
        runs = []
        for value, members in groupby(zip(self.groups, self.spans), key=lambda item: switches(item[0])):
            members = list(members)
            runs.append(Run(value, [group for group, _ in members], [hi - lo for _, (lo, hi) in members],
                            slice(members[0][1][0], members[-1][1][1])))
        return runs

    def run_states(self, kind: str, run: Run) -> list[list[Tensor]]:
        """The state lists a kernel of ``kind`` reads for ``run``, in slot order."""
        amsgrad = kind == "adam" and run.switches[0]
        return [self.state[name][run.part] for name in state_names(kind, amsgrad)]

    def per_group(self):
        """Yield ``(group, params, grads, steps, state)`` for each group's span."""
        for group, (lo, hi) in zip(self.groups, self.spans):
            yield group, self.params[lo:hi], self.grads[lo:hi], self.steps[lo:hi], {
                k: v[lo:hi] for k, v in self.state.items()
            }


# ------------------------------------------------------------------------------------------------
# What the kernel backends (cpu, cuda, triton) share
# ------------------------------------------------------------------------------------------------
def kernel_switches(kind: str):
    """What a kernel compiles in, per group: runs of groups that differ in it take separate calls."""
    if kind == "adam":
        return lambda group: (group["amsgrad"], group["decoupled_weight_decay"], group["maximize"])
    return lambda group: (group["maximize"],)


# Note [Table steps]
# Embedding tables step through their own ops, one call per run like the multi-tensor kernels:
# Adagrad with sparse gradients (exact: duplicate rows summed, only the rows present touched) and
# row-wise Adagrad (one accumulator per row) with dense or sparse gradients. Their buckets hold a few
# large tables, so they are not bound into BoundBuckets: the gather reads the gradients in Python,
# checks each against what the plan saw (layout, dtype, shape, device: a sparse gradient is a new
# tensor every step) and checks every sparse gradient's row indices, so that an index out of range
# raises before any bucket is written. The native table ops check every table's indices before they
# write anything (csrc/common/tables.cpp), so when a step is that one call (the plan's only bucket, one
# run: an embedding optimizer's usual step) the gather leaves the check to the op: on the CPU that
# saves a pass over the indices, on CUDA a host sync.


def _table_grad_signature(grad: Tensor) -> tuple:
    sparse = grad.is_sparse
    return (grad.layout, grad.dtype, grad.shape, grad.device, grad.sparse_dim() if sparse else grad.is_contiguous())


def bind_table_step(bucket: Bucket, tracing: bool) -> None:
    """What a table step's gather checks against (Note [Table steps]); CPU tables with sparse gradients
    and their ``sum`` into huge pages (Note [Table huge pages] in _huge_pages.py)."""
    if tracing:
        bucket.planned = None
        return
    bucket.planned = tuple(_table_grad_signature(p.grad) for p in bucket.params)
    if bucket.key.layout == SPARSE and bucket.key.device.type == "cpu":
        for table, state_sum in zip(bucket.params, bucket.state["sum"]):
            huge_pages.collapse(table)
            huge_pages.collapse(state_sum)


def check_row_indices(params: list[Tensor], grads: list[Tensor]) -> None:
    """Every sparse gradient's row indices within its table, else an IndexError before anything is written."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_sparse and g._nnz():
            low, high = torch.aminmax(g._indices())
            if bool(low < 0) or bool(high >= p.shape[0]):
                raise IndexError(f"a sparse gradient of a table of {p.shape[0]} rows (param {i} of its bucket) has "
                                 f"row indices from {int(low)} to {int(high)}: out of range")


def step_tables(kind: str, bucket: Bucket, sparse_adagrad, rowwise_adagrad, *, grad_scale, found_inf) -> None:
    """A kernel backend's table step (Note [Table steps]): one call of its sparse or row-wise Adagrad
    per run, with the arguments of the table ops (Note [Table ops] in csrc/ops.cpp)."""
    table_step = rowwise_adagrad if kind == "rowwise_adagrad" else sparse_adagrad
    for run in bucket.runs:
        hyper, lr_tensors = run.hyper
        (sums,) = bucket.run_states(kind, run)
        table_step(bucket.params[run.part], bucket.grads[run.part], sums, bucket.steps[run.part], run.sizes, hyper,
                   lr_tensors, maximize=run.switches[0], grad_scale=grad_scale, found_inf=found_inf)


def bind_kernel_bucket(kind: str, bucket: Bucket, tracing: bool) -> bool:
    """What every kernel backend's ``bind`` does first: split the bucket into runs by its compile-time
    switches; unwrap a SHARDED bucket (Note [Sharded parameters]) or bind a table step (Note [Table
    steps]), which need nothing more. Returns whether the backend should bind its runs (eager steps of
    the multi-tensor kernels)."""
    bucket.runs = bucket.split_runs(kernel_switches(kind))
    if bucket.key.layout == SHARDED:  # the ops on the local shards
        unwrap_shards(bucket)
        return False
    if is_table_step(kind, bucket.key):
        bind_table_step(bucket, tracing)
        return False
    return not tracing


def gather_runs(kind: str, bucket: Bucket, ops_check_indices: bool = False) -> str:
    """A kernel backend's gather: every run's bound bucket gathers its gradients in C++ (table steps,
    traced steps and sharded buckets, which have none, read them as a list), then every run's
    :func:`hyper_rows`. ``ops_check_indices``: the backend's table ops check row indices before writing
    (Note [Table steps])."""
    for run in bucket.runs:
        if run.bound is not None and run.bound.gather() != 0:
            return run.bound.change()
    if bucket.key.layout == SHARDED:
        change = _gather_shards(bucket)
        if change:
            return change
    elif bucket.runs[0].bound is None:
        grads = [p.grad for p in bucket.params]
        if any(g is None for g in grads):
            return f"a parameter of {bucket.key} has no gradient"
        if bucket.planned is not None:  # a table step (Note [Table steps])
            if tuple(map(_table_grad_signature, grads)) != bucket.planned:
                return f"a gradient of {bucket.key} changed layout, dtype, shape or device"
            if not (ops_check_indices and bucket.alone and len(bucket.runs) == 1):
                check_row_indices(bucket.params, grads)
        bucket.grads = grads
    for run in bucket.runs:
        run.hyper = hyper_rows(kind, run.groups, bucket.key.device)
    return ""


# Note [Sharded parameters]
# FSDP2 (``fully_shard``) hands the optimizer DTensor parameters: each rank holds a shard of every
# parameter, of its gradient (reduce-scattered) and of its state (``zeros_like`` of a DTensor is a
# DTensor with the same mesh and placements; row-wise Adagrad makes its ``sum`` so too). Adam's and
# Adagrad's updates are elementwise (row-wise Adagrad's, per whole row), so a rank's update of its
# shards needs nothing from the other ranks: the kernel backends step the *local* tensors (the shards
# themselves, no copy) in their usual one launch per bucket, while the optimizer's state stays
# DTensors, which is what torch.distributed.checkpoint reads and writes. We unwrap rather than register
# sharding strategies for our ops with DTensor: the ops would then need a strategy per op and schema,
# DTensor's dispatch would add per-tensor Python to every step, and what it would decide is always
# "run on the local shards" for these updates.
# Unwrapping is only right when every tensor of a parameter is sharded the same way: the plan sends a
# DTensor parameter to these kernels (layout SHARDED) only when its gradient and every state tensor are
# DTensors on the parameter's mesh with its placements, and every local tensor is contiguous (FSDP2's
# Shard(0) shards are); anything else (another placement, a Partial gradient, sparse gradients, a table
# of row-wise Adagrad sharded by columns, whose row means need whole rows) is layout DTENSOR, for the
# torch backend. Buckets may mix meshes and placements: the updates do not depend on them. A rank whose
# shard of a parameter is empty (fewer rows than ranks) steps an empty tensor: nothing to update, but
# its step counter advances, as torch's does. The step counters are plain 0-d tensors, as torch's fused
# path keeps them. The gradients are read in Python at each gather (the local tensor of each DTensor
# gradient, checked against the planned shard): a new DTensor every step, which the C++ bound buckets
# cannot read.


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local tensor itself: what ``to_local()`` returns under no_grad, where newer torch wraps it
    in a new Parameter at every call for a DTensor Parameter (no identity to check a plan against)."""
    return t._local_tensor


def unwrap_shards(bucket: Bucket) -> None:
    """Swap a SHARDED bucket's DTensors for their local shards (Note [Sharded parameters]); the DTensor
    parameters stay in ``bucket.sources``, where :func:`gather_runs` reads their gradients."""
    bucket.sources = bucket.params
    bucket.params = [local_shard(p) for p in bucket.params]
    bucket.state = {name: [t if t is None else local_shard(t) for t in tensors]
                    for name, tensors in bucket.state.items()}


def _gather_shards(bucket: Bucket) -> str:
    """This step's local gradients of a SHARDED bucket, checked against the planned shards."""
    grads = []
    for i, (source, local) in enumerate(zip(bucket.sources, bucket.params)):
        g = source.grad
        if g is None:
            return f"params[{i}] of {bucket.key} has no gradient"
        if local_shard(source) is not local:
            return f"params[{i}] of {bucket.key} holds another local shard"
        if not is_dtensor(g) or g.device_mesh != source.device_mesh or g.placements != source.placements:
            return f"the gradient of params[{i}] of {bucket.key} is not sharded as its parameter"
        g = local_shard(g)
        if g.dtype != local.dtype or g.shape != local.shape or g.device != local.device or not g.is_contiguous():
            return f"the local gradient of params[{i}] of {bucket.key} is not a contiguous shard like its parameter's"
        grads.append(g)
    bucket.grads = grads
    return ""


try:  # FSDP2's sharded parameters (Note [Sharded parameters])
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = ()


def is_dtensor(t) -> bool:
    return isinstance(t, _DTensor)


def amp_on_device(device: torch.device, grad_scale: Tensor | None, found_inf: Tensor | None):
    """GradScaler's tensors where a bucket's kernels read them. A scaler serves every device of a model
    from one scale: buckets elsewhere get an asynchronous copy (no host sync), as torch's fused
    optimizers do."""
    return tuple(t if t is None or t.device == device else t.to(device, non_blocking=True)
                 for t in (grad_scale, found_inf))


class Backend(Protocol):
    """A backend: checks, then per plan ``bind``, per step ``gather`` (reads only) and ``step`` (writes).

    ``gather`` returns ``""`` when the bucket's tensors are as the plan saw them, else why not;
    ``step`` runs only after every bucket of the optimizer gathered, so a change anywhere rebuilds
    the plan before anything is written.
    """

    name: str

    def available(self, device: torch.device) -> Availability:
        """Whether this backend can run on ``device`` at all (libraries present, kernels built)."""

    def supports(self, kind: str, key: BucketKey, groups: list[dict[str, Any]]) -> Availability:
        """Whether it can run ``kind`` ("adam" | "adagrad") for this bucket with these groups' options."""

    def bind(self, kind: str, bucket: Bucket, *, tracing: bool) -> None:
        """Split ``bucket`` into runs and keep what its steps reuse (once per plan)."""

    def gather(self, kind: str, bucket: Bucket) -> str:
        """Read this step's gradients and hyperparameters; ``""`` when everything is as planned, else
        the change. Raises for invalid hyperparameters (nothing is written before every bucket gathered)."""

    def step(self, kind: str, bucket: Bucket, *, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Update every tensor of ``bucket`` (after a successful ``gather``)."""
