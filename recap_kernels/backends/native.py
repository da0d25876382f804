"""The ``cpu`` and ``cuda`` backends: the C++ multi-tensor kernels of ``csrc/``, one module, two instances.

Both run the same ops (``recap_kernels::fused_adam_`` / ``fused_adagrad_``, schemas in
``csrc/ops.cpp``) and the same bound buckets; the dispatcher (or, for a bound bucket, the kernels
each device registered) picks the CPU or the CUDA kernel from the tensors' device. They take
contiguous float32/bfloat16/float16/float64 tensors; the registry routes every other bucket
(non-contiguous or sparse gradients, overlapping parameters, complex parameters,
``differentiable=True``) to the torch backend under ``"auto"`` and refuses it, with that reason,
when the backend is explicit.

A step is one kernel call per run of a bucket (usually one per bucket): every group's lr, betas,
eps and weight decay travel as rows of ``hyper`` (:func:`_base.hyper_rows`); only the switches
that are one per call (amsgrad, AdamW's decoupled decay, maximize) split a bucket whose groups
differ in them. In eager mode each run is bound once per plan into a BoundBucket (Note [Bound
buckets] in ``csrc/common/bucket.h``) that gathers the gradients in C++, so a step does a constant
number of Python calls per bucket. Under ``torch.compile`` the list ops run (their fake kernels and
mutation annotations are what the tracer needs).

On CUDA a step is one launch per bucket plus one that advances the step counters, whatever the
number of tensors and groups (Note [Multi-tensor launch] in ``csrc/cuda/multi_tensor.cuh``);
``step``, a Tensor lr on the device and GradScaler's tensors are read by the kernels: no host
synchronisation, so ``capturable`` steps can be captured in a CUDA graph.

Embedding tables (sparse Adagrad, row-wise Adagrad) run through the table ops
``fused_sparse_adagrad_`` / ``fused_rowwise_adagrad_`` (Note [Table steps] in ``_base.py``) where
this build has them for the device.
"""

from __future__ import annotations

import functools

import torch

from recap_kernels import _ext, _ops
from recap_kernels.backends._base import (
    OK,
    Availability,
    Bucket,
    BucketKey,
    amp_on_device,
    bind_kernel_bucket,
    gather_runs,
    is_table_step,
    kernel_supports,
    step_tables,
    table_supports,
)
from recap_kernels.backends._bound import bound_bucket

_OPS = ("fused_adam_", "fused_adagrad_")
_TABLE_OPS = ("fused_sparse_adagrad_", "fused_rowwise_adagrad_")  # Note [Table steps]

# Whether eager steps use bound buckets (tests switch it off to compare with the list ops).
bind_buckets = True


def compiled_archs() -> list[str]:
    """The ``TORCH_CUDA_ARCH_LIST`` entries this build compiled (``"9.0+PTX"``: sm_90 code plus PTX)."""
    return [a for a in _ext.build_info().get("cuda_archs", []) if a]


def arch_supported(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a GPU of ``capability`` runs this build: machine code for its major architecture at or
    below its minor version (sm_80 code runs on sm_86), or PTX of an architecture at or below it."""
    for arch in archs:
        spec = arch.upper().removesuffix("+PTX")
        try:
            major, minor = (int(x) for x in spec.split(".")[:2])
        except ValueError:
            continue
        if arch.upper().endswith("+PTX") and (major, minor) <= capability:
            return True
        if major == capability[0] and minor <= capability[1]:
            return True
    return False


@functools.cache
def _cuda_device_verdict(index: int) -> Availability:
    capability = torch.cuda.get_device_capability(index)
    archs = compiled_archs()
    if not arch_supported(capability, archs):
        return Availability(False, f"recap_kernels._C has no code for {torch.cuda.get_device_name(index)} "
                                   f"(sm_{capability[0]}{capability[1]}); it was built for {';'.join(archs)}: "
                                   f"rebuild with TORCH_CUDA_ARCH_LIST including {capability[0]}.{capability[1]}")
    return OK


class NativeBackend:
    """The C++ kernels of one device type (``"cpu"`` or ``"cuda"``)."""

    def __init__(self, device_type: str, kernels: str) -> None:
        self.name = device_type
        self.device_type = device_type
        self.kernels = kernels  # how reasons name them
        # Decided once, at import: whether the extension is there cannot change within a process, and a
        # plain attribute is what torch.compile can trace through (the loader's import machinery is not).
        self._extension = self._extension_verdict()
        self._table_ops = self._ops_verdict(_TABLE_OPS) if self._extension.ok else self._extension

    def __repr__(self) -> str:
        return f"<recap_kernels backend {self.name!r}>"

    def _extension_verdict(self) -> Availability:
        module, reason = _ext.load()
        if module is None:
            return Availability(False, reason)
        key = self.device_type.upper()
        if self.device_type == "cuda" and not _ext.build_info().get("cuda_extension"):
            notes = "; ".join(_ext.build_info().get("notes", [])) or "RECAP_KERNELS_BUILD_CUDA=0 or no nvcc at build time"
            return Availability(False, f"recap_kernels._C was built without CUDA kernels ({notes})")
        return self._ops_verdict(_OPS)

    def _ops_verdict(self, ops: tuple[str, ...]) -> Availability:
        key = self.device_type.upper()
        missing = [op for op in ops if not hasattr(torch.ops.recap_kernels, op)
                   or not torch._C._dispatch_has_kernel_for_dispatch_key(f"recap_kernels::{op}", key)]
        if missing:
            return Availability(False, f"recap_kernels._C has no {key} kernels for {', '.join(missing)}")
        return OK

    def available(self, device: torch.device) -> Availability:
        if device.type != self.device_type:
            return Availability(False, f"the {self.name} backend runs on {self.device_type.upper()} tensors, "
                                       f"not {device.type}")
        if not self._extension.ok or self.device_type == "cpu":
            return self._extension
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
        return _cuda_device_verdict(device.index if device.index is not None else torch.cuda.current_device())

    def supports(self, kind: str, key: BucketKey, groups) -> Availability:
        if is_table_step(kind, key):
            return table_supports(self.kernels, kind, key, groups, self._table_ops)
        return kernel_supports(self.kernels, key, groups)

    # -- the step -----------------------------------------------------------------------------------
    def bind(self, kind: str, bucket: Bucket, *, tracing: bool) -> None:
        if not bind_kernel_bucket(kind, bucket, tracing) or not bind_buckets:
            return
        for run in bucket.runs:
            run.bound = bound_bucket(bucket.params[run.part], bucket.run_states(kind, run), bucket.steps[run.part],
                                     run.sizes)

    def gather(self, kind: str, bucket: Bucket) -> str:
        return gather_runs(kind, bucket, ops_check_indices=True)

    def step(self, kind: str, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        grad_scale, found_inf = amp_on_device(bucket.key.device, grad_scale, found_inf)
        if is_table_step(kind, bucket.key):
            step_tables(kind, bucket, _ops.fused_sparse_adagrad_, _ops.fused_rowwise_adagrad_, grad_scale=grad_scale,
                        found_inf=found_inf)
            return
        for run in bucket.runs:
            hyper, lr_tensors = run.hyper
            if kind == "adam":
                amsgrad, decoupled, maximize = run.switches
                if run.bound is not None:
                    run.bound.adam_step(hyper, lr_tensors, amsgrad, decoupled, maximize, grad_scale, found_inf)
                    continue
                exp_avgs, exp_avg_sqs, *max_exp_avg_sqs = bucket.run_states(kind, run)
                _ops.fused_adam_(bucket.params[run.part], bucket.grads[run.part], exp_avgs, exp_avg_sqs,
                                 max_exp_avg_sqs[0] if amsgrad else [], bucket.steps[run.part], run.sizes, hyper,
                                 lr_tensors, amsgrad=amsgrad, decoupled=decoupled, maximize=maximize,
                                 grad_scale=grad_scale, found_inf=found_inf)
            else:
                (maximize,) = run.switches
                if run.bound is not None:
                    run.bound.adagrad_step(hyper, lr_tensors, maximize, grad_scale, found_inf)
                    continue
                (sums,) = bucket.run_states(kind, run)
                _ops.fused_adagrad_(bucket.params[run.part], bucket.grads[run.part], sums, bucket.steps[run.part],
                                    run.sizes, hyper, lr_tensors, maximize=maximize, grad_scale=grad_scale,
                                    found_inf=found_inf)


CPU = NativeBackend("cpu", "the C++ CPU kernels")
CUDA = NativeBackend("cuda", "the CUDA kernels")
